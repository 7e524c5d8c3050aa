"""Which runtime owns a model, a module, a layer or a model file: a small registry instead of if-chains.

A :class:`Runtime` names an *adapter* module (imported on first use, so ``import safeobs`` never imports
torchao or onnxruntime) and a cheap ``owns(module)`` test that imports nothing of the runtime.  An adapter
for torch-style models provides::

    qlayer(name, module, script) -> QLayer | None     # the int8 layer record of one module
    set_weight(layer, qweight) -> None                 # write a repaired qint8 weight back
    kernel_for(layer, engine, isa) -> dispatch.Kernel  # the kernel a layer runs (audit)
    emulate(model, engine, isa) -> context manager     # yields a safeobs.kernels.emulator.Emulation
    module_forward(mod, name, rep, engine, isa, exact) # optional: emulator hook for modules it owns

and a file runtime (``suffixes``) provides ``cmd_audit(args, dump)`` / ``cmd_repair(args, dump)``.
Registering a runtime with an emulator hook registers it into :mod:`safeobs.kernels.emulator`, so
:func:`safeobs.emulator.emulate` covers it without the kernels layer knowing any runtime.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import NamedTuple

from ..core.layers import QLayer
from ..kernels import emulator as _emulator
from ..kernels.dispatch import ENGINES, ISAS

COMBOS = tuple(f"{e}/{i}" for e in ENGINES for i in ISAS)
# torchao quantize_ models: the kernel depends on eager vs torch.compile(freezing) and the CPU (torchao.emulator)
TORCHAO_COMBOS = tuple(f"{p}/{i}" for p in ("eager", "compiled") for i in ISAS)


class Runtime(NamedTuple):
    name: str
    adapter: str  # module implementing the adapter functions, imported on first use
    owns: Callable[[object], bool] = lambda mod: False  # cheap test on an eager module, imports nothing
    kinds: tuple = ()  # QLayer.kind values of its layers
    combos: tuple = ()  # audit columns ("engine/isa") it emulates
    suffixes: tuple = ()  # model files it reads (lower-case suffixes)
    module_forward: bool = False  # its adapter has an emulator hook for the modules it owns

    def load(self):
        return importlib.import_module(self.adapter)


_RUNTIMES: list[Runtime] = []  # most specific first; the last one is the fallback for torch modules


def register(rt: Runtime, *, fallback: bool = False) -> Runtime:
    """Add a runtime (before the others, or as the fallback); idempotent by name."""
    _RUNTIMES[:] = [r for r in _RUNTIMES if r.name != rt.name]
    _RUNTIMES.insert(len(_RUNTIMES) if fallback else 0, rt)
    if rt.module_forward:
        _emulator.register_module_forward(_hook(rt), key=rt.name)
    return rt


def _hook(rt: Runtime):
    def module_forward(mod, name, rep, engine, isa, exact):
        return rt.load().module_forward(mod, name, rep, engine, isa, exact) if rt.owns(mod) else None

    return module_forward


def runtimes() -> tuple[Runtime, ...]:
    return tuple(_RUNTIMES)


def for_module(mod) -> Runtime:
    return next(rt for rt in _RUNTIMES if rt.owns(mod))


def for_layer(layer: QLayer) -> Runtime:
    return next((rt for rt in _RUNTIMES if layer.kind in rt.kinds), _RUNTIMES[-1])


def for_combo(combo: str) -> Runtime | None:
    return next((rt for rt in _RUNTIMES if combo in rt.combos), None)


def for_file(path) -> Runtime | None:
    """The runtime that reads this model file by its suffix (e.g. ``.onnx``), or None (torch files)."""
    low = os.fspath(path).lower()
    return next((rt for rt in _RUNTIMES if rt.suffixes and low.endswith(rt.suffixes)), None)


def is_script(model) -> bool:
    import torch

    return isinstance(model, torch.jit.ScriptModule)


class LayerRef(NamedTuple):
    """One int8 layer of a model, not yet read: :meth:`build` gives its :class:`QLayer`.  ``layer`` is set when
    the runtime has no cheap ``is_layer`` test (the record was built to find out)."""

    name: str
    module: object
    runtime: Runtime
    script: bool
    layer: QLayer | None = None

    @property
    def numel(self) -> int:
        """Weights of the layer (read from its module, without building the record)."""
        w = self.layer.weight if self.layer is not None else getattr(self.module, "weight", None)
        return int(w.numel()) if hasattr(w, "numel") else 0

    def build(self) -> QLayer:
        if self.layer is not None:
            return self.layer
        return self.runtime.load().qlayer(self.name, self.module, self.script)


def layer_refs(model) -> list[LayerRef]:
    """Every int8-weight layer of a model, in module order, without reading the layers of runtimes whose adapter
    has a cheap ``is_layer(module, script)`` test (torchao: building a record copies the codes, so a large model
    is read one layer at a time through :meth:`LayerRef.build`)."""
    script = is_script(model)
    out = []
    for name, mod in model.named_modules():
        rt = _RUNTIMES[-1] if script else for_module(mod)
        adapter = rt.load()
        test = getattr(adapter, "is_layer", None)
        if test is not None:
            if test(mod, script):
                out.append(LayerRef(name, mod, rt, script))
            continue
        layer = adapter.qlayer(name, mod, script)
        if layer is not None:
            out.append(LayerRef(name, mod, rt, script, layer))
    return out


def iter_layers(model):
    """:func:`layers`, one record at a time (for a torchao model: one layer's codes copied at a time)."""
    for ref in layer_refs(model):
        yield ref.build()


def layers(model) -> list[QLayer]:
    """Every int8-weight Linear/Conv/ConvTranspose of a converted model, in module order, whichever runtime
    owns each module (torch.ao eager or TorchScript, torchao ``quantize_`` Linears)."""
    return list(iter_layers(model))


def set_weight(layer: QLayer, qweight) -> None:
    """Replace a layer's quantized weight in place, through the runtime that owns it."""
    for_layer(layer).load().set_weight(layer, qweight)


def kernel_for(layer: QLayer, engine: str, isa: str):
    return for_layer(layer).load().kernel_for(layer, engine, isa)


def combos_for(found) -> tuple[str, ...]:
    """The audit columns of a model (its :class:`QLayer` s or :class:`LayerRef` s): its runtime's when one runtime
    owns every layer, else :data:`COMBOS`."""
    owners = {lay.runtime.name if isinstance(lay, LayerRef) else for_layer(lay).name for lay in found}
    if len(owners) == 1:
        return next(rt for rt in _RUNTIMES if rt.name in owners).combos or COMBOS
    return COMBOS


def _is_int8tensor_module(mod) -> bool:
    return type(getattr(mod, "weight", None)).__name__ == "Int8Tensor"


register(Runtime("torch.ao", "safeobs.torch_ao.qlayers", owns=lambda mod: True, combos=COMBOS), fallback=True)
register(
    Runtime(
        "torchao",
        "safeobs.torchao.adapter",
        owns=_is_int8tensor_module,
        kinds=("linear_torchao",),
        combos=TORCHAO_COMBOS,
        module_forward=True,
    )
)
register(Runtime("onnx", "safeobs.onnx.audit", suffixes=(".onnx",)))
register(Runtime("openvino", "safeobs.openvino.audit", suffixes=(".xml",)))
