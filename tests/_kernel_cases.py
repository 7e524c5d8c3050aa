"""Random op cases for the bit-exact tests: shapes drawn by hypothesis (derandomized), data by numpy.

A case is a :mod:`safeobs.realkernel` dict plus ``"family"`` and ``"full"`` (full-range data that can
saturate, vs. activations and x_zp in [0, 127], where no int16 lane can saturate: 2*127*128 < 32768).
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from safeobs.kernels import dispatch, layout, realkernel

FAMILIES = (
    "linear",
    "linear_dynamic",
    "stem",
    "conv2d",
    "conv1d",
    "conv3d",
    "pointwise",
    "depthwise",
    "depthwise3d",
    "depthwise_wide",
    "groupwise",
    "convT_im2col",
    "convT_direct",
    "conv_ic1",
)


@st.composite
def _shape(draw, family: str, engine: str, isa: str):
    d = {
        "family": family,
        "full": draw(st.booleans()) or family == "stem",
        "seed": draw(st.integers(0, 2**31 - 1)),
        "per_channel": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "wzp": engine != "onednn" and draw(st.booleans()),
    }
    ints = lambda lo, hi: draw(st.integers(lo, hi))  # noqa: E731
    if family in ("linear", "linear_dynamic"):
        d.update(
            op=family,
            K=draw(st.sampled_from([ints(1, 64), ints(200, 700), ints(513, 1100)])),
            OC=ints(1, 24),
            M=ints(1, 6),
            reduce_range=draw(st.booleans()),
        )
        d["wzp"] = d["wzp"] or (family == "linear_dynamic" and engine != "onednn" and draw(st.booleans()))
        return d
    if family == "stem":
        return {
            **d,
            "op": "conv2d",
            "N": 1,
            "IC": 3,
            "OCg": ints(2, 8),
            "G": 1,
            "k": (7, 7),
            "stride": 2,
            "padding": 3,
            "dilation": 1,
            "S": (ints(7, 16), ints(7, 16)),
        }
    if family in ("conv2d", "conv1d", "conv3d"):
        nd = int(family[4])
        k = tuple(ints(1, 3) for _ in range(nd))
        dil = ints(1, 2)
        return {
            **d,
            "op": family,
            "N": ints(1, 2),
            "G": ints(1, 3),
            "IC": None,
            "ICg": ints(1, 5),
            "OCg": ints(1, 4),
            "k": k,
            "stride": ints(1, 2),
            "padding": ints(0, 2),
            "dilation": dil,
            "S": tuple(ints(dil * (kk - 1) + 1, 9 if nd < 3 else 5) for kk in k),
        }
    if family == "conv_ic1":  # one input channel per group: oneDNN's relo layouts on AVX-512 VBMI (whi / wi by OW)
        g, ocg = draw(st.sampled_from([(1, ints(2, 8)), (ints(2, 8), 2), (ints(2, 4), 4)]))
        k = (ints(1, 5), ints(1, 5))
        return {
            **d,
            "op": "conv2d",
            "N": ints(1, 2),
            "G": g,
            "ICg": 1,
            "OCg": ocg,
            "k": k,
            "stride": ints(1, 2),
            "padding": ints(0, 1),
            "dilation": 1,
            "S": tuple(ints(kk, kk + 12) for kk in k),
        }
    if family == "pointwise":
        return {
            **d,
            "op": "conv2d",
            "N": ints(1, 2),
            "G": ints(1, 2),
            "ICg": ints(1, 20),
            "OCg": ints(1, 12),
            "k": (1, 1),
            "stride": 1,
            "padding": 0,
            "dilation": 1,
            "S": (ints(1, 7), ints(1, 7)),
        }
    if family in ("depthwise", "depthwise3d"):
        kk = draw(st.sampled_from([3, 5, 7])) if family == "depthwise" else 3
        k = (kk, kk) if family == "depthwise" else (draw(st.sampled_from([3, 5])), 3, 3)
        return {
            **d,
            "op": "conv2d" if family == "depthwise" else "conv3d",
            "N": ints(1, 2),
            "G": 8 * ints(1, 3),
            "ICg": 1,
            "OCg": ints(1, 2),
            "k": k,
            "stride": ints(1, 2),
            "padding": tuple((x - 1) // 2 for x in k),
            "dilation": 1,
            "S": tuple(ints(x, x + 5) for x in k),
        }
    if family == "depthwise_wide":  # > 100 groups: engine x86 keeps it on FBGEMM depthwise even on VNNI (§3)
        return {
            **d,
            "op": "conv2d",
            "N": 1,
            "G": draw(st.sampled_from([104, 112])),
            "ICg": 1,
            "OCg": 1,
            "k": (3, 3),
            "stride": ints(1, 2),
            "padding": (1, 1),
            "dilation": 1,
            "S": (ints(3, 6), ints(3, 6)),
        }
    if family == "groupwise":
        cpg = draw(st.sampled_from([2, 4, 8, 16]))
        gt = dispatch.g_together(isa, cpg, cpg)
        return {
            **d,
            "op": "conv2d",
            "N": 1,
            "G": gt * ints(1, 2),
            "ICg": cpg,
            "OCg": cpg,
            "k": (3, 3),
            "stride": ints(1, 2),
            "padding": 1,
            "dilation": 1,
            "S": (ints(3, 8), ints(3, 8)),
        }
    if family == "convT_im2col":
        st_ = ints(1, 2)
        return {
            **d,
            "op": "conv_transpose2d",
            "N": ints(1, 2),
            "G": ints(1, 2),
            "ICg": ints(1, 4),
            "OCg": ints(1, 4),
            "k": (ints(1, 3), ints(1, 3)),
            "stride": st_,
            "padding": ints(0, 1),
            "dilation": ints(1, 2),
            "output_padding": ints(0, st_ - 1) if engine != "onednn" else 0,
            "S": (ints(2, 6), ints(2, 6)),
            "per_channel": False,
            "relu": False,
        }  # no fused conv_transpose2d_relu op
    assert family == "convT_direct"
    # N == 1 and stride 1: torch 2.13's direct ConvTranspose is wrong for N > 1 or stride_h == 2 (spec §9).
    return {
        **d,
        "op": "conv_transpose2d",
        "N": 1,
        "G": 1,
        "ICg": 8 * ints(1, 2),
        "OCg": 8 * ints(1, 2),
        "k": (2, ints(1, 6)),
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "output_padding": 0,
        "S": (ints(2, 6), ints(2, 6)),
        "per_channel": False,
        "relu": False,
    }


def make_case(d: dict) -> dict:
    """Numpy data for a drawn shape."""
    rng = np.random.default_rng(d["seed"])
    hi = 255 if d["full"] else 127
    c = {"family": d["family"], "full": d["full"], "op": d["op"], "relu": d["relu"]}
    if d["op"] in ("linear", "linear_dynamic"):
        oc, wshape, xshape = d["OC"], (d["OC"], d["K"]), (d["M"], d["K"])
    else:
        g, icg, ocg = d["G"], d.get("ICg") or d["IC"], d["OCg"]
        if d["op"] == "conv_transpose2d":
            wshape, oc = (g * icg, ocg) + d["k"], g * ocg
        else:
            wshape, oc = (g * ocg, icg) + d["k"], g * ocg
        xshape = (d["N"], g * icg) + d["S"]
        c.update(groups=g, stride=d["stride"], padding=d["padding"], dilation=d["dilation"])
        if "output_padding" in d:
            c["output_padding"] = d["output_padding"]
    c["w"] = rng.integers(-128, 128, wshape).astype(np.int8)
    pc = d["per_channel"] and d["op"] != "conv_transpose2d"
    c["w_scale"] = rng.uniform(1e-3, 1e-2, oc) if pc else float(rng.uniform(1e-3, 1e-2))
    c["w_zp"] = (rng.integers(-4, 5, oc) if pc else int(rng.integers(-4, 5))) if d["wzp"] else 0
    c["bias"] = rng.normal(0, 30, oc).astype(np.float32) if d["bias"] else None
    if d["op"] == "linear_dynamic":
        x = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 10), xshape).astype(np.float32)
        c.update(x=x, reduce_range=d["reduce_range"] or not d["full"], relu=False)
        return c
    c.update(
        x=rng.integers(0, hi + 1, xshape).astype(np.uint8),
        x_scale=float(rng.uniform(0.01, 0.1)),
        x_zp=int(rng.integers(0, hi + 1)),
        y_scale=float(rng.uniform(2, 40)),
        y_zp=int(rng.integers(0, 256)),
    )
    return c


def kernel_of(c: dict, engine: str, isa: str):
    if c["op"] in ("linear", "linear_dynamic"):
        return dispatch.linear_kernel(engine, isa)
    return dispatch.conv_kernel(
        engine,
        isa,
        c["w"].shape,
        groups=c["groups"],
        stride=c["stride"],
        padding=c["padding"],
        dilation=c["dilation"],
        transposed=c["op"] == "conv_transpose2d",
        output_padding=c.get("output_padding", 0),
        weight_symmetric=bool(np.all(np.asarray(c["w_zp"]) == 0)),
        input_shape=c["x"].shape,
        x_zero_point=c["x_zp"],
        y_scale=c["y_scale"],
    )  # realkernel runs 1 thread


def known_bug(c: dict, engine: str, isa: str, host: str) -> str | None:
    """Why torch 2.13 itself is wrong on this case (kernel-spec §9), else None."""
    if c["op"] in ("linear", "linear_dynamic"):
        return None
    k = kernel_of(c, engine, isa)
    if k.backend == "fbgemm" and k.path == "direct" and (c["x"].shape[0] > 1 or np.ravel(c["stride"])[0] == 2):
        return "FBGEMM directconv N>1 / stride_h==2 (spec §9)"
    if c["op"] == "conv_transpose2d" and k.backend == "onednn" and c["w"].shape[0] != c["w"].shape[1] * c["groups"]:
        return "oneDNN ConvTranspose with IC != OC/G (spec §9)"
    if c["op"] != "conv_transpose2d" and host in ("avx512", "avx512_vbmi", "vnni") and engine != "onednn":
        icg = c["w"].shape[1]
        if dispatch.fbgemm_conv_path(
            c["w"].shape, groups=c["groups"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"], isa=host
        ) == "groupwise" and c["groups"] % dispatch.g_together(host, icg, icg):
            return "FBGEMM groupwise on AVX-512 hosts with G % G_together != 0 (spec §9)"
    return None


def draw_cases(families, n: int, *, engine: str, isa: str, seed_name: str) -> list[dict]:
    """``n`` cases per family (derandomized hypothesis draws, so the batch is the same on every run)."""
    out = []
    for fam in families:
        shapes = []

        @settings(
            max_examples=n,
            derandomize=True,
            database=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            deadline=None,
        )
        @given(_shape(fam, engine, isa))
        def collect(d):
            shapes.append(d)

        collect()
        out += [make_case(d) for d in shapes[:n]]
    return out


def host_isa() -> str:
    return realkernel.host_isa()


def layout_pairs(c, engine, isa):
    op = "linear" if c["op"].startswith("linear") else ("conv_transpose" if c["op"] == "conv_transpose2d" else "conv")
    return layout.kernel_pairs(kernel_of(c, engine, isa), c["w"].shape, op, c.get("groups", 1), isa)
