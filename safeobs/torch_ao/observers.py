"""Drop-in weight observers whose qparams can never saturate x86 int8 kernels.

Each class subclasses the torch observer of the same name and takes the same arguments plus
keyword-only ``layout`` ("x86" default, "fbgemm", "onednn", "any"), ``op`` and ``groups`` hints
(needed only for ConvTranspose weights: ``op="conv_transpose"``).  Defaults differ in one way:
``dtype=torch.qint8`` and a symmetric ``qscheme``, because these are *weight* observers
(only s8 weights feed ``vpmaddubsw``; other dtypes raise ``TypeError``).

The safe scale depends on the weight values, not only on min/max, so ``forward`` keeps the last
observed tensor, detached, as float32 on the CPU (a float32 CPU weight by reference, not copied: the
values :meth:`calculate_qparams` sees are the ones that get quantized, in-place updates such as QAT
steps included).  Weights are observed once, on the weight being quantized, so "last tensor" is
exactly the right thing; for the moving-average observers the
floor is torch's scale from the averaged min/max and the pairs come from the last tensor (the
proof covers the codes of that tensor at the returned scale).  The copy is saved in
``state_dict`` as extra state; a stock torch observer's state_dict (no copy) loads too, and then
:meth:`calculate_qparams` assumes the worst case: any two weights in the tracked [min, max] may
be paired (safe for every weight in that range, but up to one bit coarser).

``calculate_qparams`` = torch's qparams, raised by :func:`safeobs.core.solver.raise_scales` where a
pair needs it.  The histogram observer runs torch's L2 clipping search first and then raises
the scale on the clipped codes.
"""

from __future__ import annotations

import torch
from torch.ao.quantization import observer as tobs

from ..core.observer import _SafeMixin

__all__ = [
    "SafeMinMaxObserver",
    "SafeMovingAverageMinMaxObserver",
    "SafePerChannelMinMaxObserver",
    "SafeMovingAveragePerChannelMinMaxObserver",
    "SafeHistogramObserver",
]


class SafeMinMaxObserver(_SafeMixin, tobs.MinMaxObserver):
    """:class:`torch.ao.quantization.MinMaxObserver` with provably saturation-free qparams."""


class SafeMovingAverageMinMaxObserver(_SafeMixin, tobs.MovingAverageMinMaxObserver):
    """:class:`torch.ao.quantization.MovingAverageMinMaxObserver`, saturation-free (pairs of the last tensor)."""


class SafePerChannelMinMaxObserver(_SafeMixin, tobs.PerChannelMinMaxObserver):
    """:class:`torch.ao.quantization.PerChannelMinMaxObserver` with provably saturation-free qparams."""

    _default_qscheme = torch.per_channel_symmetric


class SafeMovingAveragePerChannelMinMaxObserver(_SafeMixin, tobs.MovingAveragePerChannelMinMaxObserver):
    """:class:`torch.ao.quantization.MovingAveragePerChannelMinMaxObserver`, saturation-free."""

    _default_qscheme = torch.per_channel_symmetric


class SafeHistogramObserver(_SafeMixin, tobs.HistogramObserver):
    """:class:`torch.ao.quantization.HistogramObserver`: torch's L2 clipping search, then the bound
    is enforced on the clipped codes (the scale only grows)."""

    def _stock_qparams(self):
        if not torch.isfinite(self.min_val).all():
            return super().calculate_qparams(), None
        new_min, new_max = self._non_linear_param_search()
        return self._calculate_qparams(new_min, new_max), new_min
