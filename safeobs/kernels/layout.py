"""Which weight codes the x86 int8 kernels add into one saturating int16 lane.

Every kernel computes one output channel as a dot product over ``Kg`` weights taken in the
*kernel order* (kernel-spec §5.1): taps first, input channel fastest,
``f = ((kd*KH + kh)*KW + kw)*ICg + ic`` (Linear: ``f = k``).  A *pair* is two positions of that
order whose u8*s8 products ``vpmaddubsw`` adds into one saturating int16 lane.  The pairs are the
same for every output channel of a kernel call, so they are returned as an ``(n, 2)`` array of
positions in ``[0, Kg)``; :func:`kernel_order` maps positions to indices of ``weight.ravel()``.

:func:`kernel_pairs` answers for one kernel (used by the emulator); :func:`weight_pairs` gives
the union over every kernel a *layout* covers (used by the solver and :func:`safeobs.verify`).

**Which pairs are conservative, and why.**  Every pairing here was found by pair discovery on the real
kernels (FBGEMM everywhere, oneDNN on AVX2, oneDNN on AVX512_CORE with and without VBMI from the vectors in
tests/data/onednn-avx512, torchao, MLAS).  :func:`kernel_pairs` answers for one kernel exactly; the layouts
used by the solver are unions over every kernel that may run, so they hold extra pairs where kernels differ:

* ``"onednn"`` / ``"x86"`` convs: per-tap input-channel pairs (every oneDNN conv on AVX2 and AVX-512), plus,
  for convs whose kernel rows could be folded, the per-row pairs and, with one input channel per group, the
  kw-major "whi" pairs of AVX-512 VBMI's relo layouts (which of the two runs depends on the *input* width,
  which a weight does not know), plus the flat gemm pairs of 3-D depthwise convs.  The per-row pairs for
  ICg > 1 were never seen on a real kernel (relo needs ICg == 1); they are kept from the first AVX-512
  measurements (kernel-spec §8.3) because dropping them would change existing safe scales for no safety gain.
* ``"onednn"`` / ``"x86"`` Linear: oneDNN's gemm K-block pairs for AVX2 (blocks of 256/ceil(K/2)/384) and
  AVX-512 (384/ceil(K/2)/768; forced-ISA ``_int_mm``, gemm convs), and brgemm's flat pairs.

Trust the kernels over the spec: where the two disagreed, the recorded kernels won (README, "What was
verified where").

torchao's int8 Linear runs oneDNN's matmul or ``torch._int_mm``; layout ``"x86"`` (and ``"onednn"``) covers
every pairing those were seen to form.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from .dispatch import ISAS, OPS, Kernel, conv_kernel

LAYOUTS = ("fbgemm", "onednn", "x86", "any", "ort", "openvino")

# "ort": ONNX Runtime's MLAS U8S8 kernels (QGEMM for MatMulInteger / MatMulIntegerToFloat /
# DynamicQuantizeMatMul / QLinearMatMul, ConvSym and im2col QGEMM for QLinearConv) pair the flat
# (2m, 2m+1) positions of the kernel order, like FBGEMM: found by pair discovery on the real kernels
# (tests/test_onnx.py), source onnxruntime/core/mlas/lib/qgemm_kernel_avx2.cpp (PackedK = 4, vpmaddubsw),
# convsym.cpp.  ONNX Conv weights (OC, IC/G, *k) have torch's layout; a MatMul weight B is (K, N):
# pass B.T (safeobs.onnx does).  "x86" and "any" contain these pairs too.
#
# "openvino": the OpenVINO CPU plugin's int8 kernels (bundled oneDNN; pair discovery and the bit-exact emulator in
# safeobs/openvino/, tests/test_openvino.py): Convolution / GroupConvolution pair input channels (2m, 2m+1) of one
# tap, group-local (jit_avx2_I8, jit_avx2_1x1_I8, brgconv_avx512[_1x1]_I8); grouped convs whose ICg or OCg is not a
# multiple of 4 run im2col + gemm on AVX2 (jit_gemm_I8: the kernel order in gemm_s8u8s32 K blocks, straddling taps);
# ICg == 1 convs (not depthwise) take oneDNN's relo pairs on AVX-512 ("whi", and per row on tiny inputs); depthwise
# is exact; FullyConnected pairs K in gemm_s8u8s32 blocks on AVX2 (jit_gemm_I8: K=302 -> 150 pairs) and flat on
# AVX-512 (brgemm_avx512_I8: 151).  The shape does not say the grouping, so every rule is taken.  "x86" (with the
# AVX2 gemm K blocks of convs added for it) and "any" cover it.

_EMPTY = np.zeros((0, 2), dtype=np.int64)


def onednn_exact_conv(weight_shape: Sequence[int], op: str | None = None, groups: int | None = None) -> bool:
    """True when every oneDNN kernel that may run this conv accumulates exactly: 1-D/2-D depthwise convs
    (``groups > 1``, one input and one output channel per group) run oneDNN's dw kernels on AVX2 (``jit_uni_int8``
    dw), AVX-512 (``dw``) and VNNI (``brdgmm_dw``), none of which uses ``vpmaddubsw`` (kernel-spec §8.2-§8.3;
    :func:`safeobs.kernels.dispatch.onednn_conv_path` / ``onednn_avx512_conv_path`` say "dw").  Layout ``"onednn"``
    then has no pairs for the weight, *when ``groups`` is given* (a shape alone cannot tell a depthwise conv from a
    dense one with one input channel, whose AVX-512 VBMI relo kernels do pair).  3-D depthwise (gemm on AVX-512)
    and everything else pair as before."""
    if groups is None or groups < 2 or len(weight_shape) < 3:
        return False
    shape = tuple(int(s) for s in weight_shape)
    if infer_op(shape, op) != "conv" or shape[1] != 1 or shape[0] != groups or len(shape) > 4:
        return False
    group_sizes(shape, "conv", groups)
    # the union over every ISA of the pairs of the kernel oneDNN picks (no input shape: relo counted where it may run)
    kernels = ((conv_kernel("onednn", isa, shape, groups=groups), isa) for isa in ISAS)
    return not any(len(kernel_pairs(k, shape, "conv", groups, isa)) for k, isa in kernels)


def infer_op(weight_shape: Sequence[int], op: str | None = None) -> str:
    """The op kind a weight shape belongs to; 2-D is linear, 3- to 5-D conv unless ``op`` says otherwise."""
    nd = len(weight_shape)
    if op is not None:
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if (op == "linear") != (nd == 2) or nd > 5:
            raise ValueError(f"a {op} weight cannot have shape {tuple(weight_shape)}")
        return op
    if nd == 2:
        return "linear"
    if nd in (3, 4, 5):
        return "conv"
    raise ValueError(f"weight must be 2-D (linear) or 3- to 5-D (conv), got shape {tuple(weight_shape)}")


def group_sizes(weight_shape: Sequence[int], op: str, groups: int = 1) -> tuple[int, int, int, int]:
    """``(G, OCg, ICg, taps)`` of a PyTorch weight shape; checks that ``groups`` divides it."""
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    shape = tuple(int(s) for s in weight_shape)
    if op == "linear":
        if groups != 1:
            raise ValueError("linear has no groups")
        return 1, shape[0], shape[1], 1
    taps = int(np.prod(shape[2:]))
    if op == "conv":
        if shape[0] % groups:
            raise ValueError(f"groups={groups} does not divide the {shape[0]} output channels")
        return groups, shape[0] // groups, shape[1], taps
    if shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the {shape[0]} input channels")
    return groups, shape[1], shape[0] // groups, taps


@functools.lru_cache(maxsize=256)
def _kernel_order(shape: tuple, op: str, groups: int) -> np.ndarray:
    g, ocg, icg, taps = group_sizes(shape, op, groups)
    idx = np.arange(int(np.prod(shape)), dtype=np.int64)
    if op == "linear":
        order = idx.reshape(1, ocg, icg)
    elif op == "conv":  # (OC, ICg, taps) -> (G, OCg, taps, ICg)
        order = idx.reshape(g, ocg, icg, taps).transpose(0, 1, 3, 2)
    else:  # conv_transpose (IC, OCg, taps) = (G, ICg, OCg, taps) -> (G, OCg, taps, ICg)
        order = idx.reshape(g, icg, ocg, taps).transpose(0, 2, 3, 1)
    order = np.ascontiguousarray(order).reshape(g, ocg, taps * icg)
    order.setflags(write=False)
    return order


def kernel_order(weight_shape: Sequence[int], op: str | None = None, groups: int = 1) -> np.ndarray:
    """``(G, OCg, Kg)`` indices into ``weight.ravel()``: each output channel's weights in kernel order.

    Output channel ``g*OCg + o`` reads ``weight.ravel()[order[g, o]]``.  ConvTranspose weights are
    not flipped (kernel-spec §5.1, im2col).
    """
    op = infer_op(weight_shape, op)
    return _kernel_order(tuple(int(s) for s in weight_shape), op, int(groups))


# -- pair rules, positions in [0, Kg) ------------------------------------------------------------


def flat_pairs(kg: int) -> np.ndarray:
    """(2m, 2m+1) over the whole kernel order; an odd last element is alone (FBGEMM, every path)."""
    m = np.arange(kg // 2, dtype=np.int64)
    return np.stack([2 * m, 2 * m + 1], axis=1)


def _segment_pairs(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(s+2m, s+2m+1) inside every segment [s, s+len); pairing restarts at each segment start."""
    npairs = lengths // 2
    if npairs.sum() == 0:
        return _EMPTY
    seg = np.repeat(np.arange(len(starts)), npairs)
    m = np.arange(npairs.sum()) - np.repeat(np.cumsum(npairs) - npairs, npairs)
    first = starts[seg] + 2 * m
    return np.stack([first, first + 1], axis=1).astype(np.int64)


def per_tap_pairs(taps: int, icg: int) -> np.ndarray:
    """(ic 2m, ic 2m+1) inside each tap; taps never mix (oneDNN conv/deconv, kernel-spec §8.2)."""
    return _segment_pairs(np.arange(taps, dtype=np.int64) * icg, np.full(taps, icg, dtype=np.int64))


def row_pairs(kernel_size: Sequence[int], icg: int) -> np.ndarray:
    """Pairs over (kw, ic) inside each kernel row, restarting per row (oneDNN AVX-512 'relo', §8.3)."""
    kw = int(kernel_size[-1]) if len(kernel_size) else 1
    rows = int(np.prod(kernel_size[:-1])) if len(kernel_size) > 1 else 1
    return _segment_pairs(np.arange(rows, dtype=np.int64) * kw * icg, np.full(rows, kw * icg, dtype=np.int64))


def onednn_matmul_block(k: int, isa: str = "avx2") -> int:
    """K block of oneDNN's ``gemm_s8u8s32`` (gemm_driver.cpp ``get_k_padd``; kernel-spec §8.2): pairing restarts
    at each block.  ``K`` up to ``bk_traditional``, then ``ceil(K/2)`` below ``2*bk``, then ``bk``: AVX2 256/384,
    AVX512_CORE without VNNI 384/768 (gemm_info.cpp; matches the forced-ISA ``_int_mm`` probe up to K = 3073)."""
    trad, bk = (256, 384) if isa == "avx2" else (384, 768)
    if k <= trad:
        return k
    if k < 2 * bk:
        return -(-k // 2)
    return bk


def whi_pairs(kernel_size: Sequence[int]) -> np.ndarray:
    """oneDNN AVX-512 VBMI relo "whi" (ICg == 1): the whole kernel in kw-major order, paired flat; e.g. 3x3 gives
    (0,3), (6,1), (4,7), (2,5) with 8 alone (positions kh*KW + kw)."""
    k = tuple(int(v) for v in kernel_size)
    kw = k[-1]
    rows = int(np.prod(k[:-1])) if len(k) > 1 else 1
    seq = np.arange(rows * kw, dtype=np.int64).reshape(rows, kw).T.reshape(-1)  # kw-major
    m = len(seq) // 2
    return np.stack([seq[0 : 2 * m : 2], seq[1 : 2 * m : 2]], axis=1)


def k_block_pairs(k: int, block: int) -> np.ndarray:
    starts = np.arange(0, k, block, dtype=np.int64)
    return _segment_pairs(starts, np.minimum(block, k - starts))


def kernel_pairs(
    kernel: Kernel,
    weight_shape: Sequence[int],
    op: str | None = None,
    groups: int = 1,
    isa: str = "avx2",
) -> np.ndarray:
    """Pairs, as positions of :func:`kernel_order`, that ``kernel`` adds with ``vpmaddubsw``.

    Empty when the kernel accumulates exactly (VNNI, oneDNN depthwise, oneDNN ref on AVX2).  The oneDNN kernel
    path says the pairing (:func:`safeobs.kernels.dispatch.conv_kernel`; ``"relo"``: the union of both relo layouts).
    """
    if not kernel.saturates:
        return _EMPTY
    op = infer_op(weight_shape, op)
    _, _, icg, taps = group_sizes(weight_shape, op, groups)
    if kernel.backend == "fbgemm":
        return flat_pairs(taps * icg)
    if kernel.path == "matmul":  # AVX2 gemm:jit K blocks; AVX-512 brg_matmul: flat over all of K (§8.3)
        return k_block_pairs(icg, onednn_matmul_block(icg) if isa == "avx2" else icg)
    if kernel.path == "gemm":
        return k_block_pairs(taps * icg, onednn_matmul_block(taps * icg, isa))
    k = tuple(int(s) for s in weight_shape[2:])
    if kernel.path == "relo_whi":
        return whi_pairs(k)
    if kernel.path == "relo_wi":
        return row_pairs(k, icg)
    if kernel.path == "relo":
        return _dedupe_pairs(np.concatenate([whi_pairs(k), row_pairs(k, icg)]), taps * icg)
    return per_tap_pairs(taps, icg)


# -- layouts: union over every kernel that may run ------------------------------------------------


def _dedupe_pairs(pos: np.ndarray, n: int) -> np.ndarray:
    """Each pair of ``pos`` (indices in ``[0, n)``) once, smaller index first, sorted: one int64 key per pair
    (~20x faster than ``np.unique(axis=0)``; sorting by hand also avoids its first-call import of ``numpy.ma``)."""
    if not len(pos):
        return np.zeros((0, 2), dtype=np.int64)
    key = np.sort(pos.min(axis=1) * n + pos.max(axis=1))
    key = key[np.concatenate(([True], key[1:] != key[:-1]))]
    return np.stack([key // n, key % n], axis=1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pairs_in_layout(layout: str, op: str, shape: tuple, groups: int) -> np.ndarray:
    """Union of the pair positions of every kernel ``layout`` covers, for one grouping."""
    _, _, icg, taps = group_sizes(shape, op, groups)
    kg = taps * icg
    parts = []
    if layout in ("fbgemm", "x86", "ort"):
        parts.append(flat_pairs(kg))
    if layout == "openvino":
        if op == "linear":
            parts += [k_block_pairs(kg, onednn_matmul_block(kg, "avx2")), flat_pairs(kg)]
        else:  # per tap; AVX2 gemm K blocks (grouped, ICg or OCg not a multiple of 4); AVX-512 relo (ICg == 1)
            parts += [per_tap_pairs(taps, icg), k_block_pairs(kg, onednn_matmul_block(kg, "avx2"))]
            if icg == 1:
                parts += [whi_pairs(shape[2:]), row_pairs(shape[2:], 1)]
    if layout == "x86" and op != "linear":  # OpenVINO's AVX2 gemm convs (odd K blocks differ from flat)
        parts.append(k_block_pairs(kg, onednn_matmul_block(kg, "avx2")))
        if icg == 1 and op == "conv" and len(shape) == 5:  # OpenVINO's AVX-512 relo for 3-D ICg == 1 convs
            parts.append(whi_pairs(shape[2:]))
    if layout in ("onednn", "x86"):
        if op == "linear":
            parts += [
                k_block_pairs(kg, onednn_matmul_block(kg, "avx2")),
                k_block_pairs(kg, onednn_matmul_block(kg, "avx512")),
                flat_pairs(kg),
            ]
        else:
            parts += [per_tap_pairs(taps, icg), row_pairs(shape[2:], icg)]
            if icg == 1 and op == "conv":
                if len(shape) == 5:  # 3-D depthwise runs as gemm on AVX-512 (§8.3); flat kept from before
                    parts += [flat_pairs(kg), k_block_pairs(kg, onednn_matmul_block(kg, "avx512"))]
                else:  # relo "whi" on AVX-512 VBMI, and the flat gemm its grouped convs fall back to
                    parts += [whi_pairs(shape[2:]), flat_pairs(kg)]
    return np.concatenate(parts) if parts else _EMPTY


@functools.lru_cache(maxsize=256)
def _weight_pairs(shape: tuple, layout: str, op: str, groups: int | None) -> np.ndarray:
    if op == "conv_transpose":
        candidates = [groups] if groups is not None else _divisors(shape[0])
    else:
        candidates = [1]  # conv pairs of one output channel do not depend on groups
    out = []
    for g in candidates:
        order = _kernel_order(shape, op, g if op == "conv_transpose" else 1)
        pos = _pairs_in_layout(layout, op, shape, g if op == "conv_transpose" else 1)
        if len(pos):
            rows = order.reshape(-1, order.shape[-1])
            out.append(np.stack([rows[:, pos[:, 0]], rows[:, pos[:, 1]]], axis=-1).reshape(-1, 2))
    if not out:
        return _EMPTY
    pairs = np.concatenate(out)
    if len(out) > 1 or layout not in ("fbgemm", "ort"):
        pairs = _dedupe_pairs(pairs, int(np.prod(shape)))
    pairs.setflags(write=False)
    return pairs


def weight_pairs(
    weight_shape: Sequence[int],
    layout: str = "x86",
    op: str | None = None,
    groups: int | None = None,
) -> np.ndarray:
    """``(n, 2)`` indices into ``weight.ravel()`` of every pair some kernel of ``layout`` may form.

    Layouts: ``"fbgemm"`` (flat pairs: FBGEMM on non-VNNI CPUs, and its depthwise/direct kernels
    everywhere), ``"onednn"`` (per-tap, per-row and K-block pairs), ``"x86"`` (both).  Both members
    of a pair always belong to the same output channel.  Where the shape cannot decide the
    grouping (ConvTranspose without ``groups``), the union over every possible grouping is taken.
    Layout ``"any"`` depends on the values, not the shape: see :func:`any_pairs`.
    """
    if layout not in LAYOUTS or layout == "any":
        raise ValueError(
            f"layout must be one of {tuple(x for x in LAYOUTS if x != 'any')} here, got {layout!r} (see any_pairs)"
        )
    op = infer_op(weight_shape, op)
    if op == "conv" and groups is not None:
        group_sizes(weight_shape, op, groups)
        if layout == "onednn" and onednn_exact_conv(weight_shape, op, groups):
            return _EMPTY
    return _weight_pairs(tuple(int(s) for s in weight_shape), layout, op, None if op != "conv_transpose" else groups)


@functools.lru_cache(maxsize=256)
def _position_csr(shape: tuple, layout: str, op: str, groups: int):
    """Per kernel position, the positions it is paired with (both directions): ``(indptr, partner)``."""
    pos = _pairs_in_layout(layout, op, shape, groups)
    _, _, icg, taps = group_sizes(shape, op, groups)
    kg = icg * taps
    if len(pos):
        pos = _dedupe_pairs(pos, kg)  # the union: Kg-sized, cheap
    both = np.concatenate([pos, pos[:, ::-1]])
    both = both[np.argsort(both[:, 0], kind="stable")]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(both[:, 0], minlength=kg))])
    return indptr, both[:, 1].copy(), icg, taps


def _all_flat(layout: str, op: str, icg: int, taps: int) -> bool:
    """Closed form: every kernel of the layout pairs this shape's row as (0,1), (2,3), ...  (a K block
    of even length restarts on a pair boundary; one tap: per-tap and per-row pairs are the flat ones)."""
    if op == "linear":
        blocks = (onednn_matmul_block(icg, "avx2"), onednn_matmul_block(icg, "avx512"))
        return layout in ("fbgemm", "ort") or all(b == icg or b % 2 == 0 for b in blocks)
    if layout in ("x86", "openvino") and op != "linear":  # AVX2 gemm conv K blocks: flat unless a block is odd
        b = onednn_matmul_block(icg * taps, "avx2")
        if b != icg * taps and b % 2:
            return False
    # kernel order is tap-major (t*ICg + ic), the row ic-major: they agree only with one tap or one channel
    return op == "conv" and (taps == 1 or (icg == 1 and layout in ("fbgemm", "ort")))


@functools.lru_cache(maxsize=256)
def _row_columns(shape: tuple, layout: str, op: str) -> np.ndarray:
    _, _, icg, taps = group_sizes(shape, op, 1)
    kc = icg * taps
    if _all_flat(layout, op, icg, taps):
        cols = flat_pairs(kc)
        cols.setflags(write=False)
        return cols
    pos = _pairs_in_layout(layout, op, shape, 1)
    cols = (pos % icg) * taps + pos // icg  # kernel position t*ICg + ic -> natural column ic*taps + t
    cols = _dedupe_pairs(cols, kc)
    cols.setflags(write=False)
    return cols


@functools.lru_cache(maxsize=256)
def _near_plan(shape: tuple, layout: str, op: str):
    """:meth:`PairTable.near`'s gather for one shape: the row columns, whether they are the flat pairs
    ``(0,1), (2,3), ...`` (then strided views replace the gather), and the columns as torch indices."""
    import torch

    cols = _row_columns(shape, layout, op)
    kc = int(np.prod(shape[1:]))
    flat = (
        kc % 2 == 0
        and len(cols) == kc // 2
        and np.array_equal(cols[:, 0], np.arange(0, kc, 2))
        and np.array_equal(cols[:, 1], cols[:, 0] + 1)
    )
    return cols, flat, torch.from_numpy(cols[:, 0].copy()), torch.from_numpy(cols[:, 1].copy())


class PairTable:
    """The pairs :func:`weight_pairs` gives, without building them: ``touching(elems)`` answers "which pairs
    contain these weights" from the pairs of one output channel's kernel positions (the same for every
    channel, §5.1/§8.2), in O(len(elems)).  A MiniLM-sized weight has millions of pairs; the solver only
    needs the few that hold a code of magnitude >= 65.  :meth:`array` materialises them all (cached)."""

    def __init__(
        self, weight_shape: Sequence[int], layout: str = "x86", op: str | None = None, groups: int | None = None
    ):
        op = infer_op(weight_shape, op)
        if layout not in LAYOUTS or layout == "any":
            raise ValueError(f"layout must be one of {tuple(x for x in LAYOUTS if x != 'any')} here, got {layout!r}")
        self.shape, self.layout, self.op = tuple(int(s) for s in weight_shape), layout, op
        if op == "conv" and groups is not None:
            group_sizes(self.shape, op, groups)
        self.groups = groups if op == "conv_transpose" else None
        # layout "onednn" and a depthwise conv whose groups are given: every oneDNN kernel is exact, no pairs
        self.exact = layout == "onednn" and op == "conv" and onednn_exact_conv(self.shape, op, groups)
        # ConvTranspose without groups: the union over every grouping is only available materialised
        self.structured = op != "conv_transpose" or groups is not None

    def array(self) -> np.ndarray:
        if self.exact:
            return _EMPTY
        return weight_pairs(self.shape, self.layout, self.op, self.groups)

    def __array__(self, dtype=None, copy=None):  # np.asarray(table): the materialised (n, 2) pairs
        a = self.array()
        return a.astype(dtype) if dtype is not None else (a.copy() if copy else a)

    def __len__(self) -> int:
        return len(self.array())

    def __repr__(self) -> str:
        return f"PairTable(shape={self.shape}, layout={self.layout!r}, op={self.op!r}, groups={self.groups})"

    def _row_columns(self) -> np.ndarray | None:
        """The layout's pairs of one output channel as ``(n, 2)`` columns of its natural weight row
        (linear / conv: row ``oc`` of ``weight.reshape(OC, -1)``); None for ConvTranspose (rows not contiguous)."""
        if self.op == "conv_transpose":
            return None
        return _EMPTY if self.exact else _row_columns(self.shape, self.layout, self.op)

    def near(self, weight, threshold) -> np.ndarray:
        """``(m, 2)`` flat indices of the pairs whose two weights add up to more than ``threshold`` in magnitude
        (one threshold per output channel, or one for all), in row-major order.  Only same-sign pairs can exceed
        it by more than a single weight, so with ``threshold = 127 * scale`` these hold every pair that can sum
        past 128 codes.  One gather of the weight (in torch for large weights: multi-threaded like torch's own
        observer); ConvTranspose falls back to :meth:`touching` of the elements above half the threshold."""
        import torch

        if not self.structured or self.op == "conv_transpose":
            thr = np.asarray(threshold, np.float32).reshape(-1)
            if self.op == "conv_transpose" and thr.size > 1:
                raise ValueError("per-channel thresholds of a ConvTranspose weight: use touching()")
            w = torch.as_tensor(weight)
            big = torch.nonzero((w.abs() > float(thr.max()) / 2).view(-1)).view(-1).numpy()
            return self.touching(big)
        if self.exact:
            return np.zeros((0, 2), dtype=np.int64)
        cols, flat, c0, c1 = _near_plan(self.shape, self.layout, self.op)
        if len(cols) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        kc = int(np.prod(self.shape[1:]))
        thr = np.asarray(threshold, np.float32).reshape(-1, 1)
        if np.size(weight) < 1 << 16:  # small: numpy's per-op cost is a fraction of torch's
            rows = np.asarray(weight, dtype=np.float32).reshape(self.shape[0], kc)
            total = rows[:, 0::2] + rows[:, 1::2] if flat else rows[:, cols[:, 0]] + rows[:, cols[:, 1]]
            hit = np.flatnonzero(np.abs(total, out=total) > thr)
        else:
            rows = torch.as_tensor(weight).reshape(self.shape[0], kc)
            total = rows[:, 0::2] + rows[:, 1::2] if flat else rows.index_select(1, c0).add_(rows.index_select(1, c1))
            hit = np.flatnonzero((total.abs_() > torch.from_numpy(thr)).numpy())  # numpy's nonzero: ~4x torch's
        r, j = np.divmod(hit, len(cols))
        r *= kc
        return np.stack([r + cols[j, 0], r + cols[j, 1]], axis=1)

    def touching(self, elems: np.ndarray) -> np.ndarray:
        """``(m, 2)`` indices into ``weight.ravel()`` of every pair that contains one of ``elems`` (each pair
        once, smaller index first; ``elems`` must be unique)."""
        elems = np.asarray(elems, dtype=np.int64)
        if not self.structured:
            raise ValueError("touching needs ConvTranspose groups; use array()")
        if self.exact:
            return np.zeros((0, 2), dtype=np.int64)
        g = self.groups or 1
        indptr, partner, icg, taps = _position_csr(self.shape, self.layout, self.op, g)
        if self.op == "conv_transpose":  # (G, ICg, OCg, taps)
            ocg = self.shape[1]
            blk, ic = elems // (icg * ocg * taps), (elems // (ocg * taps)) % icg
            o, t = (elems // taps) % ocg, elems % taps
        else:  # (OC, ICg, taps); Linear: taps = 1
            row, rem = elems // (icg * taps), elems % (icg * taps)
            ic, t = rem // taps, rem % taps
        p = t * icg + ic
        lens = indptr[p + 1] - indptr[p]
        rep = np.repeat(np.arange(len(elems)), lens)
        offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        q = partner[indptr[p][rep] + offs]
        qic, qt = q % icg, q // icg
        if self.op == "conv_transpose":
            other = ((blk[rep] * icg + qic) * ocg + o[rep]) * taps + qt
        else:
            other = (row[rep] * icg + qic) * taps + qt
        a = elems[rep]
        # a pair whose both members are in elems is found twice: keep it from its smaller member only
        srt = np.sort(elems)
        at = np.minimum(np.searchsorted(srt, other), len(srt) - 1)
        keep = (srt[at] != other) | (a < other)
        a, b = a[keep], other[keep]
        return np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)


def output_channel_rows(weight_shape: Sequence[int], op: str | None = None, groups: int | None = None) -> np.ndarray:
    """``(OC, Kg)`` indices into ``weight.ravel()``, one row per output channel (layout ``"any"``).

    ConvTranspose without ``groups`` uses one group, whose rows contain every grouping's rows.
    """
    op = infer_op(weight_shape, op)
    order = kernel_order(weight_shape, op, groups if (op == "conv_transpose" and groups) else 1)
    return order.reshape(-1, order.shape[-1])


def any_pairs(weight: np.ndarray, op: str | None = None, groups: int | None = None) -> np.ndarray:
    """Layout ``"any"``: per output channel, the two largest positive and the two most negative weights.

    Quantization is monotone, so these hold the top two same-sign codes: the binding pair of every
    possible pairing.  Returns ``(n, 2)`` indices into ``weight.ravel()``.
    """
    w = np.asarray(weight)
    rows = output_channel_rows(w.shape, op, groups)
    if rows.shape[1] < 2:
        return _EMPTY
    vals = w.ravel()[rows]
    top = np.argpartition(-vals, 1, axis=1)[:, :2]
    bottom = np.argpartition(vals, 1, axis=1)[:, :2]
    r = np.arange(rows.shape[0])[:, None]
    return np.concatenate([rows[r, top], rows[r, bottom]]).astype(np.int64)
