"""Output-aware u8 activation ranges for a ``prepare_pt2e`` graph (``quantize_pt2e(activation_ranges="output")``).

torchao's ``HistogramObserver`` picks each activation's clipping range ``[lo, hi]`` (hence its u8 scale and zero
point) by an approximate search on its histogram, blind to what reads the activation.  Here the range of every
per-tensor affine u8 activation observer whose tensor feeds conv/linear layers (as their input) is chosen to
minimise the error those layers' outputs get from the activation's rounding and clipping, in the diagonal
approximation, with the mean error left out::

    J(lo, hi) = sum_c d_c Var[x_c - Q(x_c)],    d_c = sum over consumers of ||W[:, c, taps]||^2

``d_c`` is the squared norm of all consumer weights reading channel ``c`` (the diagonal of ``W^T W`` folded over the
kernel taps; per group for grouped/depthwise convs; summed over consumers); ``Var`` rather than the mean square
because the data-aware rounding's bias absorbs each layer's mean output error ``W E[x] - W^ E[x^]``
(``compensate_activations``), so only the fluctuating part of the activation error reaches the output.  Measured
(eager, 1 thread, docs/pt2e.md): +0.25 dB on MobileNetV2 over the observer's ranges (5 draws), +0.09 dB on MiniLM
(1 draw; within the +-0.1 dB that the search grid alone moves it); the plain mean-square forms (weighted or not)
lose 0.2 to 1.4 dB on MiniLM, whose LayerNorm outputs have a few large channels.

The expectations are over positions sampled during the observers' own calibration pass: per observer a uniform
sample without replacement of all the positions it saw (all channels of each; a seeded bottom-k reservoir of
``min(max_positions, max(1024, max_values // C))`` positions: by default 8192 x ``C`` values below ``C`` = 64,
2 MB up to ``C`` = 512, 1024 positions above; fixed memory however long the calibration).
Candidates: a 12 x 12 geometric grid of fractions (1 to 0.01) of the sampled ``[min, max]`` for ``lo`` and ``hi``
(0 for a side whose values are all of one sign), refined twice around the best (9 points a side), scored on
per-channel histograms (1024 bins, values at bin centres); the best
of them and the observer's own qparams are then scored exactly on the samples and the lower wins, so the chosen
range's ``J`` on the samples is never above the observer's.  Observers that feed no conv/linear input (pools,
flatten, graph outputs) keep the observer's choice: with no consumer weights there is no output to measure the
error on (where a tensor feeds a conv/linear and also an add, as MobileNetV2's block outputs do, the weights are
those of the conv/linear consumers).  The choice replaces the observer by torchao's ``FixedQParamsObserver`` with
the same dtype and range, which ``convert_pt2e`` reads as it reads any observer."""

from __future__ import annotations

import dataclasses
import math
import operator

import torch

from .rounding import _fake_quant

__all__ = ["ActivationRanges", "RangeChoice", "channel_weights", "range_objective"]

# the input's channel axis per consumer op (transposed convs are left out: their weight is (IC, OC / groups, ...));
# the package's own op table (safeobs.pt2e._CONSUMERS) is not imported: the package imports this module
_AXIS = {
    torch.ops.aten.conv1d.default: 1,
    torch.ops.aten.conv2d.default: 1,
    torch.ops.aten.conv3d.default: 1,
    torch.ops.aten.linear.default: -1,
}
_GROUPS = 6  # aten.conv*d(input, weight, bias, stride, padding, dilation, groups)


@dataclasses.dataclass
class RangeChoice:
    """One activation observer's chosen u8 qparams and ``J`` (module docstring) on its samples, with the observer's
    own qparams and their ``J`` on the same samples (``objective <= observer_objective``)."""

    scale: float
    zero_point: int
    objective: float
    observer_scale: float
    observer_zero_point: int
    observer_objective: float
    channels: int
    positions: int


def _is_act_observer(m) -> bool:
    from torchao.quantization.pt2e import observer as aobs

    return (
        isinstance(m, aobs.UniformQuantizationObserverBase)
        and m.qscheme == torch.per_tensor_affine
        and not getattr(m, "is_dynamic", False)
        and m.dtype in (torch.uint8, torch.quint8)
    )


def _weight(gm, node):
    w = node.args[1] if len(node.args) > 1 else None
    if getattr(w, "op", None) == "call_module" and w.args:  # the weight's observer
        w = w.args[0]
    if getattr(w, "op", None) != "get_attr":
        return None
    return operator.attrgetter(w.target)(gm).detach().float()


def channel_weights(gm: torch.fx.GraphModule, node: torch.fx.Node):
    """``(d, axis)`` of an activation observer node of a ``prepare_pt2e`` graph: ``d[c]`` = the summed squared
    weights of every conv/linear consumer reading channel ``c`` of the observed tensor as its input (over output
    channels and kernel taps; a grouped conv's output channels read only their group), ``axis`` the tensor's
    channel axis (1 for convs, -1 for linears); None when no conv/linear reads it as its input."""
    d, axis = None, None
    for u in node.users:
        ax = _AXIS.get(u.target) if u.op == "call_function" else None
        if ax is None or not u.args or u.args[0] is not node or (axis is not None and ax != axis):
            continue
        w = _weight(gm, u)
        if w is None:
            continue
        if ax == -1:
            dc = (w * w).sum(0)
        else:
            groups = int(u.args[_GROUPS]) if len(u.args) > _GROUPS else 1
            oc, cg = w.shape[:2]
            dc = (w * w).reshape(groups, oc // groups, cg, -1).sum((1, 3)).reshape(groups * cg)
        d, axis = (dc if d is None else d + dc), ax
    return (None, None) if d is None else (d.double(), axis)


def range_objective(x: torch.Tensor, d: torch.Tensor, scale, zero_point, qmin: int = 0, qmax: int = 255) -> float:
    """``J`` exactly on samples ``x`` (N, C) with channel weights ``d`` (C,): ``sum_c d_c Var_n[x_c - Q(x_c)]``,
    ``d`` normalised to sum 1."""
    x = x.float()
    e = x - _fake_quant(x, float(scale), int(zero_point), qmin, qmax)  # the converted graph's quantize + dequantize
    n = max(len(e), 1)
    m1, m2 = e.sum(0, dtype=torch.float64) / n, (e * e).sum(0, dtype=torch.float64) / n  # float64 sums
    var = m2 - m1 * m1
    dn = d.double() / d.double().sum()
    return float((dn * var).sum())


def _qparams(lo, hi, qmin, qmax, eps):
    """torchao's per-tensor affine ``_calculate_qparams`` (the range widened to include 0), vectorised."""
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=eps).float()
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zp


class _Scorer:
    """``J`` of many candidate qparams at once from per-channel histograms of the samples (values at bin centres)."""

    def __init__(self, x, d, bins, qmin, qmax):
        n, c = x.shape
        self.qmin, self.qmax = qmin, qmax
        self.lo0, self.hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        width = (self.hi0 - self.lo0) / bins or 1.0
        idx = (x - self.lo0).mul_(1.0 / width).clamp_(0, bins - 1).long()  # non-negative: long() is floor
        idx += torch.arange(c) * bins
        self.p = torch.bincount(idx.reshape(-1), minlength=c * bins).reshape(c, bins).float() / n  # (C, B)
        self.d = (d / d.sum()).float()
        self.hw = self.d @ self.p  # (B,)
        self.v = self.lo0 + (torch.arange(bins, dtype=torch.float32) + 0.5) * width

    def __call__(self, scale, zp):
        e = self.v[None, :] - _fake_quant(self.v[None, :], scale[:, None], zp[:, None], self.qmin, self.qmax)  # (K, B)
        mu = self.p @ e.T  # (C, K): each channel's mean error
        return (e * e) @ self.hw - self.d @ (mu * mu)


def _grid(x0: float, n: int, lo_frac: float) -> torch.Tensor:
    if x0 == 0:
        return torch.zeros(1)
    f = torch.exp(torch.linspace(math.log(lo_frac), 0.0, n, dtype=torch.float64))
    return (x0 * f).float()


def _search(x, d, obs, bins=1024, grid=12, refine=2, lo_frac=0.01):
    """The chosen (scale, zp) of one observer's samples ``x`` (N, C) and weights ``d`` (module docstring)."""
    qmin, qmax = int(obs.quant_min), int(obs.quant_max)
    eps = obs.eps if isinstance(obs.eps, torch.Tensor) else torch.tensor(float(obs.eps))
    sc = _Scorer(x, d, bins, qmin, qmax)
    los, his = _grid(sc.lo0, grid, lo_frac), _grid(sc.hi0, grid, lo_frac)
    ratio = (1 / lo_frac) ** (1 / (grid - 1))
    best, best_lo, best_hi = math.inf, 0.0, sc.hi0
    for _ in range(refine + 1):
        lo, hi = torch.meshgrid(los, his, indexing="ij")
        lo, hi = lo.reshape(-1), hi.reshape(-1)
        scale, zp = _qparams(lo, hi, qmin, qmax, eps)
        obj = sc(scale, zp)
        k = int(obj.argmin())
        if float(obj[k]) < best:
            best, best_lo, best_hi = float(obj[k]), float(lo[k]), float(hi[k])
        # refine: 9 points per side spanning one coarse ratio either side of the best, within the sampled range
        f = torch.exp(torch.linspace(-math.log(ratio), math.log(ratio), 9))
        los = (best_lo * f).clamp(min=sc.lo0) if best_lo < 0 else torch.zeros(1)
        his = (best_hi * f).clamp(max=sc.hi0) if best_hi > 0 else torch.zeros(1)
        ratio = ratio**0.25
    scale, zp = _qparams(torch.tensor([best_lo]), torch.tensor([best_hi]), qmin, qmax, eps)
    return float(scale[0]), int(zp[0])


@dataclasses.dataclass
class _Reservoir:
    """A uniform sample without replacement of at most ``cap`` positions (rows of all channels) of every batch seen
    so far: each position draws a key from ``gen`` and the ``cap`` smallest keys are kept (bottom-k sampling), so
    the memory is fixed whatever the number of calibration batches, and only the kept positions are gathered."""

    d: torch.Tensor
    axis: int
    cap: int
    gen: torch.Generator
    rows: torch.Tensor | None = None  # (<= cap, C) float32
    keys: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        c = self.d.numel()
        if self.axis == -1 or x.dim() == 2:  # (..., C): positions are rows
            x, s = x.reshape(-1, c), 0
            n = x.shape[0]
        else:  # (B, C, *spatial): positions are (batch, pixel); gathered below, no channels-last copy of the tensor
            x = x.reshape(x.shape[0], c, -1)
            s = x.shape[2]
            n = x.shape[0] * s
        keys = torch.rand(n, generator=self.gen)
        pick = torch.arange(n)
        if self.keys is not None and len(self.keys) >= self.cap:  # only keys below the kept maximum can enter
            pick = torch.nonzero(keys < self.keys.max()).reshape(-1)
        if len(pick) > self.cap:
            pick = pick[torch.topk(keys[pick], self.cap, largest=False, sorted=False).indices]
        if not len(pick):
            return
        rows = (x[pick] if not s else x[pick // s, :, pick % s]).float()
        keys = keys[pick]
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
            if len(keys) > self.cap:
                keep = torch.topk(keys, self.cap, largest=False, sorted=False).indices
                rows, keys = rows[keep], keys[keep]
        self.rows, self.keys = rows, keys


class ActivationRanges:
    """Samples every eligible activation observer's input during a calibration pass (a context manager around the
    observers' pass) and then chooses and sets output-aware u8 qparams (module docstring).

    ``with ActivationRanges(prepared) as ranges: <calibration>``, then ``ranges.apply()`` (before
    ``convert_pt2e``) returns ``{observer module name: RangeChoice}``.  Deterministic: the subsample of each
    observer is drawn from a generator seeded by the observer's index (keys drawn in the batches' order)."""

    def __init__(self, prepared: torch.fx.GraphModule, max_positions: int = 8192, max_values: int = 1 << 19):
        self.gm, self.max_positions, self.max_values = prepared, int(max_positions), int(max_values)
        self.entries = {}  # observer target -> _Reservoir
        for i, node in enumerate(n for n in prepared.graph.nodes if n.op == "call_module"):
            if not _is_act_observer(prepared.get_submodule(node.target)):
                continue
            d, axis = channel_weights(prepared, node)
            if d is not None:
                cap = min(self.max_positions, max(1024, self.max_values // d.numel()))
                self.entries[node.target] = _Reservoir(d, axis, cap, torch.Generator().manual_seed(i))
        self._handles = []

    def _hook(self, target):
        r = self.entries[target]

        def hook(_m, inp, _out):
            x = inp[0] if inp else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[r.axis] != r.d.numel():
                return
            with torch.no_grad():
                r.add(x.detach())

        return hook

    def __enter__(self):
        for target in self.entries:
            self._handles.append(self.gm.get_submodule(target).register_forward_hook(self._hook(target)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def choose(self) -> dict:
        """``{observer module name: RangeChoice}`` for every sampled observer (the observers are not changed)."""
        out = {}
        for target, r in self.entries.items():
            obs, x, d = self.gm.get_submodule(target), r.rows, r.d
            if x is None or not _is_act_observer(obs):
                continue
            if not torch.isfinite(x.sum()):  # a non-finite value (or an overflowing sum): drop its positions
                x = x[torch.isfinite(x).all(1)]
                if not len(x):
                    continue
            qmin, qmax = int(obs.quant_min), int(obs.quant_max)
            s0, z0 = obs.calculate_qparams()
            s0, z0 = float(s0.reshape(-1)[0]), int(z0.reshape(-1)[0])
            s, z = _search(x, d, obs)
            j, j0 = range_objective(x, d, s, z, qmin, qmax), range_objective(x, d, s0, z0, qmin, qmax)
            if not j < j0:
                s, z, j = s0, z0, j0
            out[target] = RangeChoice(s, z, j, s0, z0, j0, d.numel(), x.shape[0])
        return out

    def apply(self) -> dict:
        """Choose (:meth:`choose`) and replace each sampled observer by a ``FixedQParamsObserver`` carrying the
        choice (same dtype and quant range); returns the choices."""
        from torchao.quantization.pt2e.observer import FixedQParamsObserver

        choices = self.choose()
        for target, ch in choices.items():
            obs = self.gm.get_submodule(target)
            fixed = FixedQParamsObserver(
                ch.scale,
                ch.zero_point,
                dtype=obs.dtype,
                qscheme=obs.qscheme,
                quant_min=obs.quant_min,
                quant_max=obs.quant_max,
            )
            *path, last = target.split(".")
            owner = self.gm.get_submodule(".".join(path)) if path else self.gm
            setattr(owner, last, fixed)
        for r in self.entries.values():
            r.rows = r.keys = None
        return choices
