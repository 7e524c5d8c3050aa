"""The observer mixin behind every safe weight observer (torch.ao's in :mod:`safeobs.torch_ao.observers`,
torchao's PT2E ones in :mod:`safeobs.pt2e`): records the weight and raises the stock observer's scales with
:func:`safeobs.core.solver.raise_scales` where a pair needs it.  Works over any torch-style observer class
(``min_val``/``max_val``, ``calculate_qparams``); imports none."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

from ..kernels.layout import LAYOUTS, infer_op
from .solver import (
    PER_CHANNEL,
    SYMMETRIC,
    _raise_scales,
    check_qscheme,
    check_range,
    layout_pairs,
    pairs_stay_in_rows,
    raise_scales,
)

_EXTRA = "_extra_state"


@functools.cache
def _base_signature(cls) -> inspect.Signature:
    """The stock observer's ``__init__`` signature (torch.ao's, or torchao's for PT2E), once per class."""
    mro = cls.__mro__
    return inspect.signature(mro[mro.index(_SafeMixin) + 1].__init__)


class _SafeMixin:
    """Shared by the safe observers: records the weight, raises torch's scales, keeps state."""

    _default_qscheme = torch.per_tensor_symmetric

    def __init__(self, *args, layout: str = "x86", op: str | None = None, groups: int | None = None, **kwargs):
        if args:  # positional arguments: map them to the stock observer's parameter names
            bound = _base_signature(type(self)).bind_partial(None, *args, **kwargs).arguments
            bound.pop("self")
            extra = bound.pop("kwargs", {})
        else:  # keywords only (the usual with_args / qconfig case): nothing to map
            bound, extra = dict(kwargs), {}
        bound.setdefault("dtype", torch.qint8)
        bound.setdefault("qscheme", self._default_qscheme)
        check_qscheme(bound["dtype"], bound["qscheme"])
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if groups is not None and (not isinstance(groups, int) or groups < 1):
            raise ValueError(f"groups must be a positive int or None, got {groups!r}")
        super().__init__(**bound, **extra)
        self.layout, self.op, self.groups = layout, op, groups
        self._safe_weight: torch.Tensor | None = None

    def forward(self, x_orig):
        out = super().forward(x_orig)
        if isinstance(x_orig, torch.Tensor) and x_orig.numel():
            # a float32 CPU weight is kept by reference (its values when calculate_qparams runs are the ones
            # that get quantized); anything else is converted
            self._safe_weight = x_orig.detach().to("cpu", torch.float32).contiguous()
        return out

    # -- qparams --------------------------------------------------------------------------------

    def _stock_qparams(self):
        """torch's qparams and the min the zero-point formula used (affine only)."""
        return super().calculate_qparams(), None

    def calculate_qparams(self):
        (scale, zp), min_val = self._stock_qparams()
        finite = bool(
            np.isfinite(self.min_val.detach().cpu().numpy()).all()
            and np.isfinite(self.max_val.detach().cpu().numpy()).all()
        )
        if not finite and self._safe_weight is None:
            return scale, zp  # never observed: torch's defaults (and its warning)
        per_channel = self.qscheme in PER_CHANNEL
        ch_axis = self.ch_axis if per_channel else None
        if self._safe_weight is not None:
            w = self._safe_weight.numpy()
            op = infer_op(w.shape, self.op)
            pairs = layout_pairs(w, self.layout, op, self.groups)
            check = not pairs_stay_in_rows(w.ndim, op, ch_axis)
        else:  # worst case from min/max only: two maxima and two minima paired in every channel
            lo = torch.clamp(self.min_val.reshape(-1), max=0).numpy()
            hi = torch.clamp(self.max_val.reshape(-1), min=0).numpy()
            w = np.stack([hi, hi, lo, lo], axis=1).astype(np.float32)
            pairs = np.array([[0, 1], [2, 3]], dtype=np.int64) + 4 * np.arange(len(w))[:, None, None]
            pairs, ch_axis, check = pairs.reshape(-1, 2), (0 if per_channel else None), False
        if min_val is None:
            min_val = self.min_val
        args = (w, pairs, scale.numpy(), zp.numpy())
        kw = dict(
            ch_axis=ch_axis,
            symmetric=self.qscheme in SYMMETRIC,
            quant_min=self.quant_min,
            quant_max=self.quant_max,
            min_val=min_val.detach().cpu().numpy(),
            check_pairs=check,
        )
        if finite and w.size:
            # NaN/Inf in the observed weight would have reached min_val/max_val: no second pass over it
            check_range(self.quant_min, self.quant_max)
            new_scale, new_zp = _raise_scales(*args, **kw)
        else:
            new_scale, new_zp = raise_scales(*args, **kw)
        return (
            torch.from_numpy(new_scale).to(scale.dtype).reshape(scale.shape),
            torch.from_numpy(new_zp).to(zp.dtype).reshape(zp.shape),
        )

    # -- state: the observed weight travels as extra state ---------------------------------------

    def get_extra_state(self):
        return {"weight": self._safe_weight}

    def set_extra_state(self, state):
        w = state.get("weight") if isinstance(state, dict) else None
        self._safe_weight = None if w is None else w.detach().to("cpu", torch.float32, copy=True)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + _EXTRA
        if key not in state_dict:  # a stock torch observer's state: forget any recorded weight
            self._safe_weight = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in missing_keys:
            missing_keys.remove(key)

    def extra_repr(self):
        hints = "".join(f", {k}={getattr(self, k)!r}" for k in ("op", "groups") if getattr(self, k) is not None)
        return f"{super().extra_repr()}, layout={self.layout!r}{hints}"
