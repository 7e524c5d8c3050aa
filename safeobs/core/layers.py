"""The protocol between runtimes and the core checker: one record per int8-weight layer.

:func:`safeobs.core.verify.check_layers` needs only ``name``, ``codes`` (stored int8 weight codes,
PyTorch weight shape), ``op`` (``"linear" | "conv" | "conv_transpose"``) and ``groups``: any object
with those attributes is a layer record (:class:`LayerCodes`, or :class:`QLayer`).  Each runtime folder
turns its models into such records; the core never imports a runtime.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class LayerRecord(Protocol):
    """What the core checker reads of a layer."""

    name: str
    op: str
    groups: int | None

    @property
    def codes(self) -> np.ndarray: ...


class LayerCodes(NamedTuple):
    """A plain layer record: stored int8 ``codes`` with the hints that give their kernel pairs."""

    name: str
    codes: np.ndarray
    op: str
    groups: int | None = None


@dataclasses.dataclass
class QLayer:
    """One quantized Linear/Conv/ConvTranspose with int8 weights, as a torch runtime exposes it."""

    name: str
    kind: str  # "linear", "linear_dynamic", "linear_torchao", "conv2d", "conv_transpose2d", ...
    op: str  # safeobs.kernels.layout op: "linear" | "conv" | "conv_transpose"
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
    def codes(self) -> np.ndarray:
        """The stored int8 codes (zero point included), PyTorch weight shape."""
        return self.weight.int_repr().numpy()

    @property
    def qscheme(self) -> str:
        """The weight's torch qscheme name, e.g. ``"per_channel_affine"``."""
        return str(self.weight.qscheme()).replace("torch.", "")

    @property
    def symmetric(self) -> bool:
        """All weight zero points are 0 (torch's ``should_use_onednn_quant`` test, kernel-spec §3)."""
        w = self.weight
        if w.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return int(w.q_zero_point()) == 0
        return self.op != "conv_transpose" and bool((w.q_per_channel_zero_points() == 0).all())
