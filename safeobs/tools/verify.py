""":func:`verify`: the core checker (:mod:`safeobs.core.verify`) on anything a user holds: codes, quantized
tensors, quantized modules and whole models of any registered runtime (:mod:`safeobs.tools.runtimes`)."""

from __future__ import annotations

import numpy as np
import torch

from ..core.progress import auto, progress_bar, rss_mb
from ..core.verify import NEG_LIMIT, POS_LIMIT, Report, Violation, check_codes, check_layers
from ..kernels.layout import LAYOUTS
from . import runtimes

__all__ = ["NEG_LIMIT", "POS_LIMIT", "Report", "Violation", "check_codes", "check_layers", "verify"]


def verify(
    obj, layout: str = "x86", *, op: str | None = None, groups: int | None = None, progress: bool | None = None
) -> Report:
    """Every weight pair of ``obj`` that can saturate under ``layout``.

    ``obj``: a quantized (qint8) weight tensor, integer codes (tensor or array; pass ``op`` and
    ``groups`` for conv_transpose), a converted quantized module, or a whole converted model
    (every quantized Linear/Conv/ConvTranspose, intrinsic fused and dynamic Linear included),
    eager or TorchScript (``torch.jit.load`` of a traced/scripted converted model: weights are
    read from the packed params); torchao ``quantize_`` models and their ``Int8Tensor`` weights.

    Models are checked one layer at a time (a torchao model: one layer's codes copied at a time).
    ``progress``: a bar on stderr per layer (None: on a terminal, for models of 50M weights or more).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(obj, torch.nn.Module):  # eager or TorchScript, any registered runtime
        refs = runtimes.layer_refs(obj)
        size = sum(r.numel for r in refs)
        bar = progress_bar(auto(progress, size), "safeobs verify", len(refs))
        try:
            return check_layers(_stepped(refs, bar), layout)
        finally:
            bar.close()
    if isinstance(obj, torch.Tensor) and type(obj).__name__ == "Int8Tensor":  # torchao weight: stored codes
        return Report(
            layout, [""], check_codes(obj.qdata.detach().cpu().numpy(), layout, op=op or "linear", groups=groups)
        )
    if isinstance(obj, torch.Tensor):
        if obj.is_quantized:
            if obj.dtype != torch.qint8:
                raise TypeError(f"only qint8 weights feed vpmaddubsw, got {obj.dtype}")
            codes = obj.int_repr().numpy()
        elif obj.is_floating_point():
            raise TypeError("verify needs quantized weights or integer codes, got a float tensor")
        else:
            codes = obj.detach().cpu().numpy()
    else:
        codes = np.asarray(obj)
    return Report(layout, [""], check_codes(codes, layout, op=op, groups=groups))


def _stepped(refs, bar):
    for ref in refs:
        yield ref.build()
        bar.step(f"{ref.name} ({rss_mb():.0f} MB RSS)")
