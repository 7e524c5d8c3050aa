"""Independent check that quantized weights can never saturate an int16 pair (kernel-spec §1).

Reads the *stored* codes (zero point included) and checks, for every pair of
:mod:`safeobs.kernels.layout`, the sign-split bound directly: the positive codes of the pair sum to
<= 128 and the negative codes to >= -128.  Shares no code with :mod:`safeobs.core.solver`.

Works on plain codes and layer records (:mod:`safeobs.core.layers`): each runtime hands its layers in
through :func:`check_layers`; :func:`safeobs.verify` (in :mod:`safeobs.tools.verify`) takes whole models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from ..kernels.layout import LAYOUTS, any_pairs, infer_op, output_channel_rows
from . import pairsums

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
        head = (
            f"VerifyReport(layout={self.layout!r}, modules={len(self.modules)}, "
            f"violations={len(self.violations)}, ok={self.ok})"
        )
        lines = [head]
        for v in self.violations[:20]:
            name = v.module or "<weight>"
            lines.append(f"  {name} channel {v.channel}: indices {v.indices} codes {v.codes} {v.sign} sum {v.pair_sum}")
        if len(self.violations) > 20:
            lines.append(f"  ... {len(self.violations) - 20} more")
        return "\n".join(lines)


def _output_channel(shape, op, groups, idx: np.ndarray) -> np.ndarray:
    rows = output_channel_rows(shape, op, groups)
    chan = np.empty(int(np.prod(shape)), dtype=np.int64)
    chan[rows] = np.arange(rows.shape[0])[:, None]
    return chan[idx]


def check_codes(
    codes, layout: str = "x86", *, op: str | None = None, groups: int | None = None, name: str = ""
) -> list[Violation]:
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
            out.append(
                Violation(
                    name, int(ch), (int(pairs[k, 0]), int(pairs[k, 1])), (int(a[k]), int(b[k])), int(sums[k]), sign
                )
            )
    return sorted(out, key=lambda v: (v.module, v.channel, v.indices, v.sign))


def check_layers(records: Iterable, layout: str = "x86") -> Report:
    """:class:`Report` over layer records (anything with ``name``, ``codes``, ``op``, ``groups``:
    :class:`safeobs.core.layers.LayerCodes`, :class:`safeobs.core.layers.QLayer`, ...)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    names, violations = [], []
    for rec in records:
        names.append(rec.name)
        violations += check_codes(rec.codes, layout, op=rec.op, groups=rec.groups, name=rec.name)
    return Report(layout, names, violations)
