"""oneDNN on AVX-512 without VNNI (issue 16): the recorded real-kernel vectors (tests/data/onednn-avx512) replayed
through safeobs on every host, and re-run on the real kernels where this host reaches them.

Modes of the recording and the CPU kinds they are: ``forced`` = ``isa="avx512_vbmi"`` (AVX512_CORE with VBMI: relo
layouts), ``skx`` = ``isa="avx512"`` (Skylake-SP), ``native`` = ``isa="vnni"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from safeobs import emulator
from safeobs.kernels import dispatch, layout, realkernel, record

DATA = Path(__file__).parent / "data" / "onednn-avx512"
MODES = {"forced": "avx512_vbmi", "skx": "avx512", "native": "vnni"}
FAMILIES = sorted(p.name[len("cases_") : -4] for p in DATA.glob("cases_*.npz"))
# formats of the brgemm relo layouts (README of the vectors): kw-major whole kernel, or per kernel row
RELO = {"Adcb16a": "relo_whi", "aBedc16b": "relo_whi", "Acdb16a": "relo_wi", "aBdec16b": "relo_wi"}


INPUTS = record.load_cases(DATA, kinds=("op", "module_dynamic"))  # the recorder's reader: one definition


def _cases(family):
    d, nat = np.load(DATA / f"cases_{family}.npz"), np.load(DATA / f"native_vnni_{family}.npz")
    out = []
    for i, (c, p) in enumerate(zip(INPUTS[family], (json.loads(s) for s in d["params_json"]))):
        pre = f"c{i:03d}_"
        real = {"forced": d[pre + "y_forced"], "skx": d[pre + "y_skx"], "native": nat[pre + "y_native"]}
        impl = {"forced": str(d["impl_forced"][i]), "skx": str(d["impl_skx"][i]), "native": str(nat["impl_native"][i])}
        out.append((c, p.get("kind", "op"), real, impl))
    return out


ALL = [(f, i, case) for f in FAMILIES for i, case in enumerate(_cases(f))]


def _relo_format(impl: str) -> str | None:
    return next((RELO[f] for f in RELO if impl.endswith("|" + f)), None)


@pytest.mark.parametrize("mode", list(MODES))
def test_emulator_reproduces_every_recorded_case(mode):
    """Bit-exact (uint8 codes, float32 bits) with the kernel dispatch predicts, for all 390 cases in each mode,
    including the small IC=1 convs a VBMI CPU hands to jit_int8 (brgemm's scratchpad guard)."""
    isa = MODES[mode]
    bad = []
    for family, i, (c, _, real, impl) in ALL:
        y = emulator.run_case(c, engine="onednn", isa=isa)
        if not np.array_equal(y, real[mode]):
            bad.append((family, i, impl[mode]))
    assert not bad, f"{len(bad)} recorded {mode} cases differ: {bad[:5]}"


def test_recorded_implementations_are_the_kernels_dispatch_names():
    """Each recorded relo weight format is the relo layout dispatch picks, and every IC=1 conv that ran jit_int8
    or a per-tap brgemm layout is predicted exact."""
    relo = fallback = 0
    for family, i, (c, kind, real, impl) in ALL:
        if not c["op"].startswith("conv") or c["op"] == "conv_transpose2d":
            continue
        w = np.shape(c["w"])
        k = dispatch.conv_kernel(
            "onednn",
            "avx512_vbmi",
            w,
            groups=c.get("groups", 1),
            stride=c.get("stride", 1),
            padding=c.get("padding", 0),
            dilation=c.get("dilation", 1),
            input_shape=c["x"].shape,
            x_zero_point=c["x_zp"],
            y_scale=c["y_scale"],
        )
        want = _relo_format(impl["forced"])
        if want is not None:
            if int(np.prod(w[2:-1])) == 1:  # one kernel row (1 x k, conv1d): whi == wi
                assert k.path in ("relo_whi", "relo_wi"), (family, i)
            else:
                assert k.path == want, (family, i, w, impl["forced"])
            relo += 1
        elif w[1] == 1 and "jit_int8" in impl["forced"] and c.get("groups", 1) == 1:
            assert not k.saturates, (family, i, w, k)
            fallback += 1
    assert relo >= 20 and fallback >= 5


def _pair_shapes():
    d = np.load(DATA / "pairs.npz")
    return d, [json.loads(s) for s in d["shape_json"]]


def _shape_kernel(s, isa):
    w = tuple(s["wshape"])
    if s["family"].startswith("linear"):
        return dispatch.linear_kernel("onednn", isa), w, "linear", 1
    op = "conv_transpose" if s["op"].startswith("conv_t") else "conv"
    k = dispatch.conv_kernel(
        "onednn",
        isa,
        w,
        groups=s["groups"],
        stride=s["stride"],
        padding=s["padding"],
        dilation=s["dilation"],
        transposed=op == "conv_transpose",
        input_shape=(1, w[1] * s["groups"]) + tuple(s["S"]),
    )  # probes: batch 1, x_zp 0
    return k, w, op, s["groups"]


def _known_bug(s):
    """torch 2.13's grouped ConvTranspose with IC != OC returns garbage on oneDNN (kernel-spec §9)."""
    return s["op"].startswith("conv_t") and s["wshape"][0] != s["wshape"][1] * s["groups"]


@pytest.mark.parametrize("mode", ["forced", "skx"])
def test_pair_discovery_matches_kernel_pairs_and_layouts_cover_it(mode):
    """Every candidate pair that saturated is a pair of the predicted kernel (and of the "onednn"/"x86" layouts);
    and every predicted pair saturated."""
    d, shapes = _pair_shapes()
    isa, res, cand, cs = MODES[mode], d["res_" + mode], d["cand"], d["cand_shape"]
    missed, extra = [], []
    for i, s in enumerate(shapes):
        sel = np.flatnonzero((cs == i) & ((res == 0) | (res == 1)))
        if not len(sel) or s["family"] == "linear_dynamic_module" or _known_bug(s):
            continue
        k, w, op, g = _shape_kernel(s, isa)
        pred = {tuple(sorted(p)) for p in layout.kernel_pairs(k, w, op, g, isa).tolist()}
        got = np.array([tuple(c) in pred for c in cand[sel].tolist()])
        sat = res[sel] == 1
        if (sat & ~got).any():
            missed.append((i, s["family"], w, k.path))
        if (got & ~sat).any():
            extra.append((i, s["family"], w, k.path))
        if sat.any():  # the layouts the solver uses hold every real pair (channel 0's weight indices)
            g_lay = g if op == "conv_transpose" else None
            order = layout.kernel_order(w, op, g if op == "conv_transpose" else 1)
            order0 = order.reshape(-1, order.shape[-1])[0]
            need = {tuple(sorted((int(order0[a]), int(order0[b])))) for a, b in cand[sel][sat]}
            for lay in ("onednn", "x86"):
                have = {tuple(p) for p in layout.weight_pairs(w, lay, op, g_lay).tolist()}
                assert need <= have, (lay, i, s["family"], w)
    assert not missed, f"real saturating pairs safeobs does not predict ({mode}): {missed[:5]}"
    assert not extra, f"predicted pairs that never saturated ({mode}): {extra[:5]}"


@pytest.mark.parametrize("mode", list(MODES))
def test_real_kernels_match_the_recording_where_this_host_reaches_them(mode):
    """Re-run the recorded op cases on this host's real kernels when it is (or can be forced to) that CPU kind."""
    isa = MODES[mode]
    run_mode = realkernel.mode_for(isa, "onednn")
    if run_mode is None or run_mode == "haswell":
        pytest.skip(f"this {realkernel.host_isa()} host cannot run {isa} kernels (the replay tests above cover it)")
    picked = [(f, i, case) for f, i, case in ALL if case[1] == "op"]
    real = realkernel.run_ops([c for _, _, (c, *_rest) in picked], mode=run_mode, engine="onednn")
    bad = [(f, i) for (f, i, (_, _, rec, _)), y in zip(picked, real) if not np.array_equal(y, rec[mode])]
    assert not bad, f"{realkernel.describe(run_mode, 'onednn')} differs from the recording on {bad[:8]}"


def test_recorder_reproduces_the_recording_on_this_host(tmp_path):
    """``python -m safeobs.kernels.record`` re-runs recorded inputs on every CPU kind this host reaches, keeping the
    oneDNN implementation of each case; its outputs equal the shipped recording for the kinds both have."""
    import shutil

    src = tmp_path / "in"
    src.mkdir()
    for fam in ("conv2d_ic1", "linear_dynamic"):
        shutil.copy(DATA / f"cases_{fam}.npz", src / f"cases_{fam}.npz")
    kinds = ("avx512", "avx512_vbmi", "vnni")
    if all(realkernel.mode_for(isa, "onednn") in (None, "haswell") for isa in kinds):
        pytest.skip(f"this {realkernel.host_isa()} host reaches no AVX-512 kind")
    host = record.record(tmp_path / "out", src, isas=kinds)
    reached = [isa for isa in kinds if isa in host["modes"]]
    assert reached
    by_isa = {v: k for k, v in MODES.items()}
    for fam in ("conv2d_ic1", "linear_dynamic"):
        new = np.load(tmp_path / "out" / f"cases_{fam}.npz")
        old = [case for f, _, case in ALL if f == fam and case[1] == "op"]
        for isa in reached:
            impls = new[f"impl_{isa}"]
            assert all(s != "none" for s in impls)
            for i, (_, _, real, impl) in enumerate(old):
                assert np.array_equal(new[f"c{i:03d}_y_{isa}"], real[by_isa[isa]]), (fam, i, isa)
                assert impls[i].split("|")[1] == impl[by_isa[isa]].split("|")[1], (fam, i, isa)
