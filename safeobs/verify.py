"""Independent check that quantized weights can never saturate an int16 pair (kernel-spec §1).

Reads the *stored* codes (``int_repr()``, zero point included) and checks, for every pair of
:mod:`safeobs.layout`, the sign-split bound directly: the positive codes of the pair sum to
<= 128 and the negative codes to >= -128.  Shares no code with :mod:`safeobs.solver`.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from . import pairsums, qlayers
from .layout import LAYOUTS, any_pairs, infer_op, output_channel_rows

POS_LIMIT = 128  # 255 * 128 = 32640 <= 32767
NEG_LIMIT = -128  # 255 * -128 = -32640 >= -32768


class Violation(NamedTuple):
    """One pair whose codes can saturate: ``pair_sum`` is the sum of its ``sign`` codes."""

    module: str
    channel: int
    indices: tuple  # indices into weight.ravel()
    codes: tuple
    pair_sum: int
    sign: str  # "positive" (> 128) or "negative" (< -128)


class Report:
    """Result of :func:`verify`: ``violations`` (a list of :class:`Violation`) and ``modules`` checked."""

    def __init__(self, layout: str, modules: list[str], violations: list[Violation]):
        self.layout, self.modules, self.violations = layout, modules, violations

    @property
    def ok(self) -> bool:
        return not self.violations

    def __bool__(self) -> bool:
        return self.ok

    def __len__(self) -> int:
        return len(self.violations)

    def __iter__(self):
        return iter(self.violations)

    def __repr__(self) -> str:
        head = (f"VerifyReport(layout={self.layout!r}, modules={len(self.modules)}, "
                f"violations={len(self.violations)}, ok={self.ok})")
        lines = [head]
        for v in self.violations[:20]:
            name = v.module or "<weight>"
            lines.append(f"  {name} channel {v.channel}: indices {v.indices} codes {v.codes} "
                         f"{v.sign} sum {v.pair_sum}")
        if len(self.violations) > 20:
            lines.append(f"  ... {len(self.violations) - 20} more")
        return "\n".join(lines)


def _output_channel(shape, op, groups, idx: np.ndarray) -> np.ndarray:
    rows = output_channel_rows(shape, op, groups)
    chan = np.empty(int(np.prod(shape)), dtype=np.int64)
    chan[rows] = np.arange(rows.shape[0])[:, None]
    return chan[idx]


def check_codes(codes, layout: str = "x86", *, op: str | None = None, groups: int | None = None,
                name: str = "") -> list[Violation]:
    """Violations among integer weight ``codes`` (stored int8 values, PyTorch weight shape)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers (the stored int8 values), got dtype {c.dtype}")
    op = infer_op(c.shape, op)
    if layout == "any":
        c = c.astype(np.int64)
        pairs = any_pairs(c, op, groups)
        flat = c.ravel()
        a, b = flat[pairs[:, 0]], flat[pairs[:, 1]]
    else:  # only the violating pairs, from strided pair sums (issue 20): no (n, 2) pair table
        pairs, a, b = pairsums.violations(c, layout, op, groups)
    pos = np.maximum(a, 0) + np.maximum(b, 0)
    neg = np.minimum(a, 0) + np.minimum(b, 0)
    out = []
    for sign, sums, bad in (("positive", pos, pos > POS_LIMIT), ("negative", neg, neg < NEG_LIMIT)):
        hit = np.flatnonzero(bad)
        if hit.size == 0:
            continue
        chans = (_output_channel if layout == "any" else pairsums.channels)(c.shape, op, groups, pairs[hit, 0])
        for k, ch in zip(hit, chans):
            out.append(Violation(name, int(ch), (int(pairs[k, 0]), int(pairs[k, 1])),
                                 (int(a[k]), int(b[k])), int(sums[k]), sign))
    return sorted(out, key=lambda v: (v.module, v.channel, v.indices, v.sign))


def verify(obj, layout: str = "x86", *, op: str | None = None, groups: int | None = None) -> Report:
    """Every weight pair of ``obj`` that can saturate under ``layout``.

    ``obj``: a quantized (qint8) weight tensor, integer codes (tensor or array; pass ``op`` and
    ``groups`` for conv_transpose), a converted quantized module, or a whole converted model
    (every quantized Linear/Conv/ConvTranspose, intrinsic fused and dynamic Linear included),
    eager or TorchScript (``torch.jit.load`` of a traced/scripted converted model: weights are
    read from the packed params); torchao ``quantize_`` models and their ``Int8Tensor`` weights.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(obj, torch.nn.Module):  # eager or TorchScript
        found = qlayers.layers(obj)
        violations = [v for lay in found for v in check_codes(lay.weight.int_repr().numpy(), layout, op=lay.op,
                                                              groups=lay.groups, name=lay.name)]
        return Report(layout, [lay.name for lay in found], violations)
    if isinstance(obj, torch.Tensor) and type(obj).__name__ == "Int8Tensor":  # torchao weight: stored codes
        return Report(layout, [""], check_codes(obj.qdata.detach().cpu().numpy(), layout, op=op or "linear",
                                                groups=groups))
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
