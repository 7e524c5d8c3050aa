"""The torchao adapter of :mod:`safeobs.tools.runtimes`: ``quantize_`` Linears as layer records."""

from __future__ import annotations

from ..core.layers import QLayer
from ..kernels.dispatch import Kernel
from . import qlayer as _qlayer
from . import set_weight
from .emulator import emulate as _emulate
from .emulator import int_mm_kernel, is_torchao_linear, module_forward

__all__ = ["emulate", "is_layer", "kernel_for", "module_forward", "qlayer", "set_weight"]


def qlayer(name: str, mod, script: bool = False) -> QLayer | None:
    return _qlayer(name, mod) if not script and is_torchao_linear(mod) else None


def kernel_for(layer: QLayer, engine: str, isa: str) -> Kernel:
    """The kernel torchao's int8 matmul runs; ``engine`` is a torchao path ("eager" | "compiled") or a torch.ao
    engine (fbgemm/x86: eager, onednn: compiled)."""
    k = int_mm_kernel(isa, engine if engine in ("eager", "compiled") else "compiled" if engine == "onednn" else "eager")
    return Kernel(k.backend, "matmul" if k.backend == "onednn" else "int_mm", k.saturates)


def emulate(model, engine: str, isa: str):
    return _emulate(model, isa=isa, path=engine)


def is_layer(mod, script: bool = False) -> bool:
    """Whether :func:`qlayer` gives a record for ``mod``, without building it (that copies the codes)."""
    return not script and is_torchao_linear(mod)
