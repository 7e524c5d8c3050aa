"""torchao ``quantize_`` configs whose int8 weights can never saturate an int16 pair on x86.

Drop-ins for torchao 0.18's configs of the same names, with the same fields and defaults plus
``layout="x86"``::

    from torchao.quantization import quantize_
    import safeobs.torchao
    quantize_(model, safeobs.torchao.Int8DynamicActivationInt8WeightConfig())

Activations keep torchao's full 8-bit range (per-token symmetric by default).  In every x86 kernel
that torchao reaches (``torch._int_mm`` through oneDNN, or ``onednn.qlinear_pointwise`` after
Inductor's freezing passes) the activation codes enter ``vpmaddubsw`` as u8 in [0, 255] (oneDNN adds
128 to an s8 source; torchao adds it itself on VNNI hosts).  So the sign-split pair bound on the
weight codes (:mod:`safeobs.core.solver`) is exactly what is needed, for any activation value.  The
per-row (or per-tensor) weight scales are torchao's own, raised by the solver only where a pair of
the layout needs it; the weights stay torchao ``Int8Tensor``s, so torch.compile, serialization and
everything else downstream are torchao's.

Covered: ``Int8DynamicActivationInt8WeightConfig`` and ``Int8StaticActivationInt8WeightConfig``
(both run ``Int8Tensor``'s int8 x int8 linear), also as ``base_config`` of torchao's SmoothQuant/AWQ,
which look handlers up by config type.  Not covered, because no int8 x int8 kernel runs:
``Int8WeightOnlyConfig`` (float activations times int8 weights), ``Int8DynamicActivationIntxWeightConfig``
and ``IntxWeightOnlyConfig`` (their CPU path dequantizes the weight and runs a float linear here).

Importing this module imports torchao (optional: ``pip install torchao``); ``import safeobs`` never does.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import types
import warnings
import weakref
from functools import partial

import numpy as np
import torch
from scipy.linalg import blas

try:
    import torchao as _torchao
    from torchao.quantization import quant_api as _qa
    from torchao.quantization.granularity import PerRow, PerTensor
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor, QuantizeTensorToInt8Kwargs
    from torchao.quantization.transform_module import register_quantize_module_handler
    from torchao.quantization.utils import _module_extra_repr, get_block_size
except ImportError:  # pragma: no cover - exercised only without torchao
    raise ImportError("safeobs.torchao needs torchao, which is not installed: pip install torchao") from None

from ..core import rounding as _rounding
from ..core import statefile
from ..core.layers import LayerCodes, QLayer
from ..core.progress import auto, progress_bar, rss_mb
from ..core.rounding import _batches, _blas_threads, ledoit_wolf_intensity, round_weight, shrink
from ..core.solver import layout_pairs, raise_scales
from ..core.verify import Report, check_codes, check_layers
from . import emulator as emulator_torchao

__all__ = [
    "Int8DynamicActivationInt8WeightConfig",
    "Int8StaticActivationInt8WeightConfig",
    "COVERED_CONFIGS",
    "safe_weight_scale",
    "quantize_weight",
    "quantized_linears",
    "verify",
    "make_picklable",
    "quantize_",
    "save",
]

# Layouts that cover the oneDNN pairing torchao's kernels use (K-block pairs on AVX2, flat pairs of u8
# brg_matmul and gemm_api K blocks on AVX-512; emulator_torchao.kernel_pairs): "fbgemm" (flat only) misses
# the K-block restarts.
TORCHAO_LAYOUTS = ("x86", "onednn", "any")


def _check_layout(layout):
    if layout not in TORCHAO_LAYOUTS:
        raise ValueError(
            f"layout must be one of {TORCHAO_LAYOUTS} for torchao's oneDNN int8 matmul, got {layout!r}"
            + (" ('fbgemm' misses oneDNN's AVX2 K-block pairs)" if layout == "fbgemm" else "")
        )


@dataclasses.dataclass
class Int8DynamicActivationInt8WeightConfig(_qa.Int8DynamicActivationInt8WeightConfig):
    """torchao's ``Int8DynamicActivationInt8WeightConfig`` (same fields and defaults) with safe weights.

    ``layout``: which kernels' pairs the weights must be safe for (default ``"x86"``: every x86 kernel).
    ``reduce_range=True`` is torchao's own 7-bit/7-bit answer, safe by itself; it is passed through.
    """

    layout: str = "x86"

    def __post_init__(self):
        super().__post_init__()
        _check_layout(self.layout)


@dataclasses.dataclass
class Int8StaticActivationInt8WeightConfig(_qa.Int8StaticActivationInt8WeightConfig):
    """torchao's ``Int8StaticActivationInt8WeightConfig`` (same fields and defaults) with safe weights.

    Static activation codes are clamped to the int8 range like dynamic ones, so the same bound holds.
    """

    layout: str = "x86"

    def __post_init__(self):
        super().__post_init__()
        _check_layout(self.layout)


COVERED_CONFIGS = ("Int8DynamicActivationInt8WeightConfig", "Int8StaticActivationInt8WeightConfig")


# -- weights ---------------------------------------------------------------------------------------


def _granularities(config):
    act, weight = Int8Tensor._normalize_granularity(config.granularity)
    return act, weight


def safe_weight_scale(
    weight: torch.Tensor, granularity=None, *, layout: str = "x86", reduce_range: bool = False
) -> torch.Tensor:
    """torchao's symmetric int8 weight scale for ``weight`` (N, K), raised per row only where a pair
    of ``layout`` could saturate; shaped like torchao's (keepdim), float32."""
    _check_layout(layout)
    granularity = PerRow() if granularity is None else granularity
    if not isinstance(granularity, (PerRow, PerTensor)):
        raise ValueError(f"granularity must be PerRow() or PerTensor(), got {granularity!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(
            f"weight must be a 2-D float tensor (a Linear weight), got "
            f"{type(weight).__name__} {getattr(weight, 'shape', '')}"
        )
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
    block = list(get_block_size(weight.shape, granularity))
    scale, _ = choose_qparams_affine(
        input=weight,
        mapping_type=MappingType.SYMMETRIC,
        block_size=block,
        target_dtype=torch.int8,
        quant_min=qmin,
        quant_max=qmax,
        scale_dtype=torch.float32,
        zero_point_dtype=torch.int8,
        keepdim=True,
        eps=torch.finfo(torch.float32).eps,
    )
    if not torch.isfinite(scale).all():  # amin/amax carry NaN and Inf into the scale: no extra pass over weight
        raise ValueError("weight contains NaN or Inf; no finite scale can be proven safe")
    if reduce_range:  # |codes| <= 64: every pair sums within [-128, 126]
        return scale
    w = weight.detach().to(torch.float32).cpu().numpy()  # torchao quantizes w * f32(1/s) in float32 too
    per_row = isinstance(granularity, PerRow)
    new, _ = raise_scales(
        w,
        layout_pairs(w, layout, "linear"),
        scale.detach().cpu().numpy().reshape(-1),
        ch_axis=0 if per_row else None,
        symmetric=True,
        check_pairs=False,
    )
    return torch.from_numpy(new.astype(np.float32)).reshape(scale.shape).to(scale.device)


def quantize_weight(weight: torch.Tensor, config) -> Int8Tensor:
    """The ``Int8Tensor`` torchao's handler would build for ``config``, with safe weight scales."""
    act_g, weight_g = _granularities(config)
    scale = safe_weight_scale(weight, weight_g, layout=config.layout, reduce_range=bool(config.reduce_range))
    static = isinstance(config, _qa.Int8StaticActivationInt8WeightConfig)
    extra = {}
    if static:
        if config.act_quant_scale is None:
            raise ValueError("Int8StaticActivationInt8WeightConfig needs act_quant_scale")
        extra = dict(
            act_quant_scale=config.act_quant_scale.detach(),
            act_quant_zero_point=None if config.act_quant_zero_point is None else config.act_quant_zero_point.detach(),
        )
    q = Int8Tensor.from_hp(
        weight,
        granularity=weight_g,
        scale=scale,
        act_quant_kwargs=QuantizeTensorToInt8Kwargs(
            granularity=act_g, mapping_type=config.act_mapping_type, reduce_range=config.reduce_range
        ),
        reduce_range=config.reduce_range,
        **extra,
    )
    # the solver's guarantee, re-checked on the stored codes: ~3% of quantize_ since issue 20 (safeobs.pairsums)
    left = check_codes(q.qdata.detach().cpu().numpy(), config.layout, op="linear")
    if left:  # never expected
        raise RuntimeError(f"{len(left)} weight pairs still unsafe after solving; please report")
    return q


_BAR: contextvars.ContextVar = contextvars.ContextVar("safeobs_torchao_bar", default=None)  # quantize_'s bar


def _transform(module: torch.nn.Module, config, *, parameter_name: str = "weight") -> torch.nn.Module:
    """torchao's int8 handler body (inductor settings, Parameter, extra_repr) with :func:`quantize_weight`."""
    if config.set_inductor_config:
        _torchao.quantization.utils.recommended_inductor_config_setter()
    if not hasattr(module, parameter_name):
        raise ValueError(f"{type(module).__name__} has no attribute {parameter_name!r} to quantize")
    new_weight = quantize_weight(getattr(module, parameter_name), config)
    setattr(module, parameter_name, torch.nn.Parameter(new_weight, requires_grad=False))  # frees the float weight
    bar = _BAR.get()
    if bar is not None:
        bar.step(f"{'x'.join(map(str, new_weight.shape))} ({rss_mb():.0f} MB RSS)")
    module.extra_repr = types.MethodType(
        partial(_module_extra_repr, original_extra_repr=module.extra_repr, parameter_name=parameter_name), module
    )
    make_picklable(module)
    return module


def make_picklable(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``torch.save(model)`` work on a ``quantize_``'d model, in place.

    torchao's handlers set ``module.extra_repr`` to a method over a ``functools.partial``, which
    pickle cannot name (``'functools.partial' object has no attribute '__name__'``).  Naming it
    ``extra_repr`` makes pickle store it as ``getattr(module, "extra_repr")``: a loaded model has
    the class's ``extra_repr``; weights, config and behaviour are unchanged.
    """
    for mod in model.modules():
        er = vars(mod).get("extra_repr")
        if (
            isinstance(er, types.MethodType)
            and isinstance(er.__func__, partial)
            and not hasattr(er.__func__, "__name__")
        ):
            er.__func__.__name__ = "extra_repr"
    return model


def save(model: torch.nn.Module, f, *, arch: str | None = None) -> None:
    """Save a torchao-quantized model as a safeobs state file (:func:`safeobs.save`): its state
    dict (``Int8Tensor`` weights) and layer list.  ``safeobs audit f`` / ``repair`` read it without running
    code; ``safeobs.load_model(f, arch=...)`` loads it into the model ``arch`` builds.  (To ``torch.save``
    the module itself, a pickle that needs trust to load, call :func:`make_picklable` first.)"""
    statefile.write(model, f, [qlayer(name, mod) for name, mod in quantized_linears(model)], arch=arch)


register_quantize_module_handler(Int8DynamicActivationInt8WeightConfig)(_transform)
register_quantize_module_handler(Int8StaticActivationInt8WeightConfig)(_transform)


# -- one call: quantize_ with optional calibration (issue 19) ----------------------------------------


@contextlib.contextmanager
def _bar(enabled, label: str, mods: list):
    """A progress bar over ``mods`` (Linears) that :func:`_transform` steps; None when off (see ``quantize_``)."""
    bar = progress_bar(auto(enabled, sum(int(m.weight.numel()) for m in mods)), label, len(mods))
    token = _BAR.set(bar)
    try:
        yield bar
    finally:
        _BAR.reset(token)
        bar.close()


def _selected(model: torch.nn.Module, filter_fn) -> list:
    """The Linears torchao's ``quantize_`` hands to the handler (its default filter: ``_is_linear``)."""
    select = _qa._is_linear if filter_fn is None else filter_fn
    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and select(m, name)]


_STOCK_INT8 = (_qa.Int8DynamicActivationInt8WeightConfig, _qa.Int8StaticActivationInt8WeightConfig)


def _refuse_stock_int8(config) -> None:
    """TypeError for torchao's own int8 x int8 configs (also as a ``base_config``): their weights can saturate."""
    for c in (config, getattr(config, "base_config", None)):
        if isinstance(c, _STOCK_INT8) and not isinstance(
            c, (Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig)
        ):
            raise TypeError(
                f"safeobs.torchao.quantize_ got torchao's own {type(c).__name__}, whose int8 weights can saturate "
                f"int16 pairs on x86; use safeobs.torchao.{type(c).__name__} (same fields and defaults)"
            )


_STACK_MAX = 1 << 24  # weights (elements) per stacked rounding of Linears sharing H: 64 MB of float32 rows


@dataclasses.dataclass
class _LinearStats:
    """``sum x x^T`` (upper triangle, float32 numpy array; the lower triangle is not kept) of one Linear's inputs and
    their count; ``leader``: the Linear whose sum this one shares (it read the same tensors), or None.  ``buf``: rows
    not summed yet (``nb`` of them; at least 256 or K/4 rows, a quarter of the sum's bytes); ``syrk``: summed by
    BLAS ``ssyrk`` (with one torch thread and K < 2048) rather than torch's GEMM (below)."""

    k: int
    xx: np.ndarray | None = None
    n: int = 0
    leader: str | None = None
    x4: float = 0.0  # sum over rows of ||x||^4 (the Ledoit-Wolf intensity's statistic)
    buf: torch.Tensor | None = None
    nb: int = 0
    syrk: bool = False


def _flush(st: _LinearStats) -> None:
    """Add the buffered rows' ``x^T x`` to the upper triangle of the sum."""
    b, st.nb = st.buf[: st.nb], 0
    if not len(b):
        return
    if st.syrk:  # ssyrk computes the triangle alone, half a GEMM's work
        bn = b.numpy()
        out = blas.ssyrk(1.0, bn.T, beta=1.0, c=st.xx.T, trans=0, lower=1, overwrite_c=1)  # lower of xx.T: upper
        if not np.shares_memory(out, st.xx):  # pragma: no cover - the C-contiguous sum is F-contiguous transposed
            st.xx[...] = out.T
        return
    # torch's GEMM, in torch's thread pool: a BLAS of another pool between the forward's ops fights its threads
    # for the cores (2 threads on 2 cores: 4x slower).  Four row strips from the diagonal: 62% of a full product.
    xx, step = torch.from_numpy(st.xx), -(-st.k // 4)
    for i0 in range(0, st.k, step):
        i1 = min(st.k, i0 + step)
        xx[i0:i1, i0:].addmm_(b[:, i0:i1].mT, b[:, i0:])


def _upper_h(st: _LinearStats) -> np.ndarray:
    """float64 ``E[x x^T]``, upper triangle (the lower one zero), from the sum (the buffered rows added first); frees
    the sum.  What the rounding reads (:func:`safeobs.core.rounding.round_weight` with ``h_upper=True``)."""
    _flush(st)
    st.buf = None
    h = np.divide(st.xx, st.n, dtype=np.float64)
    st.xx = None
    if not st.syrk:  # torch's strips also summed the lower half of their diagonal blocks
        step = -(-st.k // 4)
        for i0 in range(0, st.k, step):
            d = h[i0 : i0 + step, i0 : i0 + step]
            d[np.tril_indices(len(d), -1)] = 0.0
    return h


def _symmetric_h(st: _LinearStats) -> np.ndarray:
    """float64 ``E[x x^T]`` in full (:func:`_upper_h` mirrored); frees the sum."""
    h = _upper_h(st)
    h += np.triu(h, 1).T
    return h


def _calibrate_linears(model, names, calibration, progress, *, share: bool):
    """One forward pass per calibration batch with a pre-hook on each Linear in ``names``: ``{name: _LinearStats}``.

    ``share``: a Linear whose first input (in the first batch) is the very tensor an earlier Linear summed gets
    that Linear as ``leader`` and sums nothing; after every batch its inputs must have been exactly its leader's
    (same tensors, same order), else None is returned (the caller reruns with ``share=False``)."""
    stats = {n: _LinearStats(model.get_submodule(n).in_features) for n in names}
    seen, owner, state = {n: [] for n in names}, {}, {"batch": 0, "broken": False}

    def hook(_m, args, kwargs, name):
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        st = stats[name]
        if share:
            seen[name].append(id(x))
            if st.leader is None and state["batch"] == 0 and not st.n and not seen[name][:-1]:
                hit = owner.get(id(x))
                if hit is not None and hit[1]() is x:
                    st.leader = hit[0]
            if st.leader is not None:
                hit = owner.get(id(x))
                if hit is None or hit[0] != st.leader or hit[1]() is not x:
                    state["broken"] = True
                return
            hit = owner.get(id(x))
            if hit is None or hit[1]() is not x:  # a freed tensor's id is reused by new ones: replace stale entries
                owner[id(x)] = (name, weakref.ref(x))
        a = x.detach().reshape(-1, st.k).to(device="cpu", dtype=torch.float32)
        st.x4 += float(torch.linalg.vector_norm(a, dim=1, dtype=torch.float64).pow(4).sum())
        if st.xx is None:
            st.xx = np.zeros((st.k, st.k), np.float32)
            st.buf = torch.empty((max(256, st.k // 4), st.k), dtype=torch.float32)
            st.nb, st.syrk = 0, st.k < syrk_k
        r0 = 0
        while r0 < a.shape[0]:
            take = min(a.shape[0] - r0, st.buf.shape[0] - st.nb)
            st.buf[st.nb : st.nb + take] = a[r0 : r0 + take]
            st.nb += take
            r0 += take
            if st.nb == st.buf.shape[0]:
                _flush(st)
        st.n += a.shape[0]

    # one torch thread: inputs narrower than 2048 are summed by ssyrk (the triangle alone, half the work) on one
    # BLAS thread.  With more, everything by torch's GEMM in torch's pool: between torch's parallel ops its idle
    # threads spin, and a BLAS call of another pool (even one-threaded) then runs beside them (measured with 2
    # threads on this 2-core host: MiniLM's quantize_ 0.3 s slower).  The forward itself already rounds differently
    # with other thread counts, so the sums' order adds no new dependence.
    syrk_k = _rounding._BLAS_THREADS_K if torch.get_num_threads() == 1 else 0
    handles = [model.get_submodule(n).register_forward_pre_hook(partial(hook, name=n), with_kwargs=True) for n in names]
    enabled = auto(progress, sum(int(model.get_submodule(n).weight.numel()) for n in names))
    cbar = progress_bar(
        enabled, "safeobs.torchao calibration", len(calibration) if hasattr(calibration, "__len__") else None
    )
    try:
        with torch.no_grad(), _blas_threads(0) if syrk_k else contextlib.nullcontext():
            for batch in _batches(calibration):
                model(*batch)
                if share:
                    for n, st in stats.items():
                        if st.leader is not None and seen[n] != seen[st.leader]:
                            state["broken"] = True
                    if state["broken"]:
                        return None
                    for v in seen.values():
                        v.clear()
                    owner.clear()
                    state["batch"] += 1
                cbar.step(f"{rss_mb():.0f} MB RSS")
    finally:
        cbar.close()
        for h in handles:
            h.remove()
    for st in stats.values():
        if st.leader is not None:
            st.n, st.x4 = stats[st.leader].n, stats[st.leader].x4
    return stats


def quantize_(model: torch.nn.Module, config=None, *, calibration=None, filter_fn=None, device=None, progress=None):
    """torchao's ``quantize_(model, config, filter_fn, device)`` with safe weights, data-aware with calibration.

    ``config=None`` is :class:`Int8DynamicActivationInt8WeightConfig` ``()``.  Without ``calibration`` this is
    exactly ``torchao.quantization.quantize_(model, config, ...)`` with safeobs's config: round-to-nearest
    (RTN) at the tightest safe scales.  With ``calibration`` (an iterable of positional-argument tuples), the
    float model runs once over it with a hook on every Linear that ``filter_fn`` selects (torchao's default:
    every ``nn.Linear``), collecting ``H = sum x x^T`` of its inputs; then ``config`` quantizes the model as
    usual and each Linear's per-row int8 codes and scales are replaced by
    :func:`safeobs.core.rounding.round_weight`'s (pair-clipped GPTQ rounding and scale search, layout
    ``config.layout``), one Linear at a time: each is rounded, quantized and written before the next (the
    float weight is freed as its ``Int8Tensor`` replaces it).  Only ``qdata`` and ``scale`` of torchao's
    ``Int8Tensor`` change (same block_size,
    act_quant_kwargs, activation scales).  Per row, the codes kept are the better, on the calibration
    objective ``e^T H e`` (``e`` = float row - scale * codes; ``H`` shrunk, below), of the data-aware codes and
    the config's own
    RTN codes: never worse than the call without calibration (``model._safeobs_rounding``: ``{name:
    {"error": ..., "rtn_error": ...}}`` per row).  Bias correction is off (the objective is
    ``E[(e.x)^2]``; the float bias is untouched).

    Linears that read the very same tensor (attention's Q/K/V, an MLP's gate/up) share one ``H``, summed once
    and rounded as one stacked weight (one factor, one recursion) while the stack is at most 16M weights.  This
    needs a calibration that can be iterated again (a list, a DataLoader): should a Linear later read another
    tensor than its partners, the calibration runs again without sharing; a one-shot iterator never shares.

    ``H`` is shrunk toward ``(tr H / K) I`` by its Ledoit-Wolf intensity
    (:func:`safeobs.core.rounding.ledoit_wolf_intensity`: about 0 with many calibration rows; with a few hundred
    tokens for a wide Linear the sample ``H`` is rank-deficient and the rounding would fit the calibration set).

    Memory: ``H`` is accumulated in float32 (the upper triangle, by torch's GEMM over buffered rows: at least 256
    or K/4 rows, another quarter of the sum's bytes), one K x K matrix per distinct
    Linear input (K = in_features): K=4096 is 64 MB, K=11008 is 485 MB, all held until the calibration ends.
    float32 halves the memory of float64; the per-batch products are float32 BLAS either way and the rounding
    dampens ``H``
    (:data:`safeobs.core.rounding.DAMP`).  The rounding then converts one layer's ``H`` at a time to float64
    (a few K x K float64 temporaries, ~1 GB each at K=11008) and frees it before the next layer.

    Data-aware rounding needs per-row weight scales (``PerRow()``, torchao's default) and full-range codes:
    with ``PerTensor()`` or ``reduce_range=True`` the weights stay RTN at safe scales (a warning says so).
    torchao's own ``Int8DynamicActivationInt8WeightConfig`` / ``Int8StaticActivationInt8WeightConfig`` (also as
    the ``base_config`` of SmoothQuant/AWQ) raise TypeError, with or without calibration: their weights can
    saturate.  Other configs go to torchao unchanged without calibration (safeobs covers only the two above;
    docs/torchao.md "Covered configs") and raise TypeError with it.  Returns ``model`` (quantized in place, like
    torchao's).

    ``progress``: a bar on stderr, one step per Linear with its shape and the process's RSS (and one per
    calibration batch); ``None`` (default) shows it on a terminal for models of 50M weights or more
    (:func:`safeobs.core.progress.auto`), ``False`` never.
    """
    config = Int8DynamicActivationInt8WeightConfig() if config is None else config
    _refuse_stock_int8(config)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be None, True or False, got {type(progress).__name__}")
    if calibration is None:
        with _bar(progress, "safeobs.torchao quantize_", _selected(model, filter_fn)):
            _qa.quantize_(model, config, filter_fn=filter_fn, device=device)
        return model
    if not isinstance(config, (Int8DynamicActivationInt8WeightConfig, Int8StaticActivationInt8WeightConfig)):
        raise TypeError(
            f"calibration needs one of safeobs.torchao's configs {COVERED_CONFIGS}, got {type(config).__name__}"
        )
    if isinstance(calibration, torch.Tensor):
        raise TypeError("calibration must be an iterable of positional-argument tuples, e.g. [(x,)]; got a Tensor")
    _, weight_g = _granularities(config)
    if not isinstance(weight_g, PerRow) or config.reduce_range:
        warnings.warn(
            "safeobs.torchao.quantize_: data-aware rounding needs PerRow() weights and reduce_range=False; "
            "the weights stay round-to-nearest at the tightest safe scales",
            stacklevel=2,
        )
        with _bar(progress, "safeobs.torchao quantize_", _selected(model, filter_fn)):
            _qa.quantize_(model, config, filter_fn=filter_fn, device=device)
        return model
    select = filter_fn if filter_fn is not None else (lambda m, _name: isinstance(m, torch.nn.Linear))
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and select(mod, n)]
    # Linears that read the very same input tensor (attention's Q/K/V, an MLP's gate/up) share one H: accumulated
    # once, rounded stacked.  Only with a calibration that can be iterated again: if the sharing breaks on some
    # batch (a Linear later reads another tensor), the calibration reruns with none.
    again = hasattr(calibration, "__len__") and iter(calibration) is not calibration
    stats = _calibrate_linears(model, names, calibration, progress, share=again)
    if stats is None:
        stats = _calibrate_linears(model, names, calibration, progress, share=False)
    if stats and not any(st.n for st in stats.values()):
        raise ValueError("calibration was empty: no selected Linear saw an input")
    errors, done = {}, set()
    todo = [model.get_submodule(name) for name in stats]
    enabled = auto(progress, sum(int(m.weight.numel()) for m in todo))
    groups = {}  # leader -> [names], in the leader's order
    for name, st in stats.items():
        groups.setdefault(st.leader or name, []).append(name)
    with _bar(enabled, "safeobs.torchao quantize_ (data-aware)", todo):
        for leader, members in groups.items():  # one group at a time: round, quantize, write; then the next
            st = stats[leader]
            if st.n == 0:
                continue  # never saw an input: RTN below, with the layers the filter selects but no hook saw
            x4 = st.x4 / st.n
            h = _upper_h(st)  # float64 E[x x^T], its upper triangle (all the rounding reads); frees the float32 sum
            # Ledoit-Wolf shrinkage toward (tr H / K) I: a few hundred calibration tokens for K = 1536 leave H
            # rank-deficient, and GPTQ's feedback would fit them (safeobs.core.rounding.ledoit_wolf_intensity)
            h = shrink(h, ledoit_wolf_intensity(h[None], x4, st.n, upper=True), overwrite=True)
            # rows stacked while small (one factor, one recursion); a large Linear is rounded on its own
            chunks, cur = [], []
            for name in members:
                if cur and sum(model.get_submodule(n).weight.numel() for n in cur + [name]) > _STACK_MAX:
                    chunks.append(cur)
                    cur = []
                cur.append(name)
            chunks.append(cur)
            for chunk in chunks:
                mods = [model.get_submodule(name) for name in chunk]
                ws = [mod.weight.detach() for mod in mods]  # the float weights, kept past the handler
                for mod in mods:  # torchao's handler (safeobs's): the call without calibration's codes and scales
                    _qa.quantize_(mod, config, filter_fn=lambda m, _fqn, mod=mod: m is mod, device=device)
                    if not isinstance(mod.weight, Int8Tensor):  # pragma: no cover - the handler always makes one
                        raise RuntimeError(
                            f"expected a torchao Int8Tensor weight after quantize_, got {type(mod.weight)}"
                        )
                wqs = [mod.weight for mod in mods]
                q0 = np.concatenate([wq.qdata.detach().cpu().numpy() for wq in wqs])
                s0 = np.concatenate([wq.scale.detach().float().cpu().numpy().reshape(-1) for wq in wqs])
                w = ws[0] if len(ws) == 1 else torch.cat([x.to("cpu", torch.float32) for x in ws])
                del ws
                # the handler's scales and codes are round_weight's base: per row, never worse than them
                r = round_weight(
                    w, h, layout=config.layout, op="linear", bias_correction=False, scale=s0, rtn_codes=q0, h_upper=True
                )
                del w, q0
                r0 = 0
                for name, wq in zip(chunk, wqs):
                    r1 = r0 + wq.qdata.shape[0]
                    codes, scale = torch.from_numpy(r.codes[r0:r1]), torch.from_numpy(r.scale[r0:r1])
                    with torch.no_grad():
                        wq.qdata.copy_(codes.to(wq.qdata.device))
                        wq.scale.copy_(scale.reshape(wq.scale.shape).to(wq.scale.device, wq.scale.dtype))
                    left = check_codes(wq.qdata.detach().cpu().numpy(), config.layout, op="linear")
                    if left:  # never expected: both candidates are safe row by row
                        raise RuntimeError(
                            f"{name}: {len(left)} weight pairs unsafe after data-aware rounding; please report"
                        )
                    errors[name], done = (r.error[r0:r1], r.rtn_error[r0:r1]), done | {name}
                    r0 = r1
                del r
            del h
        rest = filter_fn if filter_fn is not None else _qa._is_linear
        _qa.quantize_(model, config, filter_fn=lambda m, fqn: fqn not in done and rest(m, fqn), device=device)
    # per row, the calibration objective of the stored codes and of the call without calibration
    model._safeobs_rounding = {name: dict(error=e[0], rtn_error=e[1]) for name, e in errors.items()}
    return model


# -- reading quantized models (verify / audit / repair) ---------------------------------------------


def quantized_linears(model: torch.nn.Module):
    """``(name, module)`` of every Linear whose weight is a torchao int8 x int8 ``Int8Tensor``."""
    return [(n, m) for n, m in model.named_modules() if emulator_torchao.is_torchao_linear(m)]


def as_qtensor(weight: Int8Tensor) -> torch.Tensor:
    """The ``Int8Tensor``'s codes and scales as a torch qint8 tensor (per-channel axis 0, or per-tensor)."""
    codes, scale = emulator_torchao.weight_codes(weight)
    q = torch.from_numpy(np.ascontiguousarray(codes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensor creation is deprecated (pytorch/pytorch#184982)
        return _as_qtensor(q, scale)


def _as_qtensor(q, scale):
    if scale.size == 1:
        return torch._make_per_tensor_quantized_tensor(q, float(scale[0]), 0)
    return torch._make_per_channel_quantized_tensor(
        q, torch.from_numpy(scale.astype(np.float64)), torch.zeros(scale.size, dtype=torch.int64), 0
    )


class _Int8TensorLayer(QLayer):
    """The :class:`QLayer` of a torchao int8 Linear without copies until asked: ``codes`` is a read-only view
    of the ``Int8Tensor``'s ``qdata`` (of a ``torch.load(mmap=True)`` file: read from disk as used), and the
    qint8 ``weight`` (a copy of the codes) is built on first use (repair)."""

    @property
    def weight(self) -> torch.Tensor:
        if self._weight is None:
            self._weight = as_qtensor(self.module.weight)
        return self._weight

    @weight.setter
    def weight(self, value) -> None:
        self._weight = value

    @property
    def codes(self) -> np.ndarray:
        w = self.module.weight
        if w.zero_point is not None and bool((w.zero_point != 0).any()):
            return self.weight.int_repr().numpy()
        out = w.qdata.detach().cpu().numpy().view()
        out.setflags(write=False)
        return out

    @property
    def qscheme(self) -> str:
        if self._weight is not None:
            return super().qscheme
        return "per_tensor_affine" if self.module.weight.scale.numel() == 1 else "per_channel_affine"


def qlayer(name: str, mod) -> QLayer:
    """A :class:`safeobs.core.layers.QLayer` view of a torchao int8 Linear (kind ``"linear_torchao"``); its
    qint8 ``weight`` is built on first use, its ``codes`` are the ``Int8Tensor``'s own (read-only)."""
    return _Int8TensorLayer(name, "linear_torchao", "linear", None, mod.bias, module=mod)


def set_weight(layer: QLayer, qweight: torch.Tensor) -> None:
    """Write a qint8 weight's codes and scales back into the layer's ``Int8Tensor``, in place."""
    w = layer.module.weight
    if qweight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        scale = torch.tensor([qweight.q_scale()], dtype=torch.float64)
        zp = torch.tensor([qweight.q_zero_point()])
    else:
        scale, zp = qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points()
    if bool((zp != 0).any()):
        raise ValueError(f"{layer.name}: torchao int8 weights are symmetric; got nonzero zero points")
    with torch.no_grad():
        w.qdata.copy_(qweight.int_repr().to(w.qdata.device))
        w.scale.copy_(scale.to(torch.float32).reshape(w.scale.shape).to(w.scale.device))
    layer.weight = qweight


def verify(model: torch.nn.Module, layout: str = "x86") -> Report:
    """:func:`safeobs.verify` for a torchao-quantized model: every weight pair that can saturate."""
    return check_layers(
        (LayerCodes(name, mod.weight.qdata.detach().cpu().numpy(), "linear") for name, mod in quantized_linears(model)),
        layout,
    )
