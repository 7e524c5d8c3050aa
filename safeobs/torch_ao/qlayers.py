"""The int8-weight layers of a converted model, eager or TorchScript: read them, swap their weights.

Shared by ``safeobs audit`` and ``safeobs repair``.  Eager models are converted torch.ao modules
(static, fused, dynamic); TorchScript models (``torch.jit.save`` of a traced/scripted converted
model) keep each quantized module as a ``RecursiveScriptModule`` whose weights live in its
packed params, read with ``torch.ops.quantized.*_unpack`` and written back with ``*_prepack``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from typing import Optional

import torch


class ModelError(ValueError):
    """A model or input spec that cannot be loaded (the CLI reports it in one line, exit code 2)."""


@dataclasses.dataclass
class QLayer:
    """One quantized Linear/Conv/ConvTranspose with int8 weights."""

    name: str
    kind: str  # "linear", "linear_dynamic", "conv2d", "conv_transpose2d", ...
    op: str  # safeobs.layout op: "linear" | "conv" | "conv_transpose"
    weight: torch.Tensor  # qint8 quantized weight, PyTorch shape
    bias: Optional[torch.Tensor]
    groups: int = 1
    stride: tuple = ()
    padding: tuple = ()
    dilation: tuple = ()
    output_padding: tuple = ()
    module: object = None  # the eager module or the RecursiveScriptModule
    script: bool = False

    @property
    def symmetric(self) -> bool:
        """All weight zero points are 0 (torch's ``should_use_onednn_quant`` test, kernel-spec §3)."""
        w = self.weight
        if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return int(w.q_zero_point()) == 0
        return self.op != "conv_transpose" and bool((w.q_per_channel_zero_points() == 0).all())


# -- loading ---------------------------------------------------------------------------------------


def is_script(model) -> bool:
    return isinstance(model, torch.jit.ScriptModule)


def load_model(spec: str, *, trust_pickle: bool = False, arch=None):
    """``(model, source)`` from a model file or ``module:function``; nothing in a file runs by default.

    Files: a safeobs state file or a state dict (``torch.load(weights_only=True)``; a plain state dict
    needs ``arch``, the ``module:function`` or callable that builds the model); a full pickle or a
    TorchScript archive only with ``trust_pickle=True`` (see :mod:`safeobs.serialization`).
    ``module:function`` is imported and called (the user named it).  ``source`` is "state",
    "state_dict", "torchscript", "pickle" or "function".  Raises :class:`ModelError`.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a path or 'module:function', got {type(spec).__name__}")
    spec = os.fspath(spec)
    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise ModelError(f"{spec}: is a directory, expected a model file")
        from .serialization import load

        return load(spec, trust_pickle=trust_pickle, arch=arch)
    if ":" not in spec:
        raise ModelError(f"{spec}: no such file (MODEL is a model file or module:function)")
    if arch is not None:
        raise ModelError(f"{spec}: --arch is for state-dict files, not module:function")
    model = call_spec(spec)
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model, "function"


def call_spec(spec: str):
    """Import ``module:function`` (the current directory is importable) and call it without arguments."""
    if not isinstance(spec, str):
        raise TypeError(f"expected 'module:function', got {type(spec).__name__}")
    mod_name, _, fn_name = spec.rpartition(":")
    if not mod_name or not fn_name:
        raise ModelError(f"{spec}: expected module:function")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelError(f"{spec}: cannot import {mod_name!r} ({e})") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelError(f"{spec}: {mod_name!r} has no function {fn_name!r}")
    return fn()


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
    if type(getattr(mod, "weight", None)).__name__ == "Int8Tensor":  # torchao quantize_ (imports torchao)
        from . import emulator_torchao, torchao

        return torchao.qlayer(name, mod) if emulator_torchao.is_torchao_linear(mod) else None
    found = _module_weight(mod)
    if found is None:
        return None
    w, op, groups = found
    if op == "linear":
        dynamic = isinstance(mod, torch.ao.nn.quantized.dynamic.Linear)
        return QLayer(name, "linear_dynamic" if dynamic else "linear", op, w, mod.bias(), module=mod)
    nd = w.dim() - 2
    kind = f"conv_transpose{nd}d" if op == "conv_transpose" else f"conv{nd}d"
    return QLayer(name, kind, op, w, mod.bias(), groups=int(groups), stride=tuple(mod.stride),
                  padding=tuple(mod.padding), dilation=tuple(mod.dilation),
                  output_padding=tuple(getattr(mod, "output_padding", (0,) * nd)), module=mod)


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

    return QLayer(name, kind, "conv_transpose" if transposed else "conv", w, b,
                  groups=int(getattr(q, f"conv{dims}d_groups")(pp)), stride=hp("stride"),
                  padding=hp("padding"), dilation=hp("dilation"),
                  output_padding=hp("output_padding") if transposed else (0,) * nd, module=mod, script=True)


def layers(model) -> list[QLayer]:
    """Every int8-weight Linear/Conv/ConvTranspose of a converted model, in module order."""
    out = []
    script = is_script(model)
    for name, mod in model.named_modules():
        layer = _script_layer(name, mod) if script else _eager_layer(name, mod)
        if layer is not None:
            out.append(layer)
    return out


def set_weight(layer: QLayer, qweight: torch.Tensor) -> None:
    """Replace a layer's quantized weight in place, keeping its bias and hyper-parameters."""
    if layer.kind == "linear_torchao":
        from . import torchao

        return torchao.set_weight(layer, qweight)
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


def load_inputs(path: str | None = None, photos: int | None = None, scale: float = 1.0) -> tuple | None:
    """Sample inputs as an argument tuple: a ``torch.save``'d tensor or tuple/list of tensors, or the
    first ``photos`` held-out ImageNet-normalised photos (N, 3, 224, 224); multiplied by ``scale``."""
    if path is not None and photos is not None:
        raise ModelError("give --inputs or --photos, not both")
    if path is not None:
        if not os.path.isfile(path):
            raise ModelError(f"{path}: no such inputs file")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{path}: cannot load inputs ({type(e).__name__})") from None
        args = tuple(obj) if isinstance(obj, (tuple, list)) else (obj,)
        if not args or not all(isinstance(a, torch.Tensor) for a in args):
            raise ModelError(f"{path}: expected a tensor or a tuple/list of tensors")
    elif photos is not None:
        if photos < 1:
            raise ModelError("--photos must be >= 1")
        from . import data

        x = data.photos("heldout")
        if photos > len(x):
            raise ModelError(f"--photos must be <= {len(x)}")
        args = (x[:photos],)
    else:
        return None
    if scale != 1.0:
        args = tuple(a * scale if a.is_floating_point() else a for a in args)
    return args
