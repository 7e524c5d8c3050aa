"""``safeobs demo``: the forum report "Quantized Conv2d op bad output", end to end on real weights.

Two MobileNetV2 layers with their BatchNorm folded in (as FX fusion does): the stem conv
``features.0.0`` and the depthwise conv ``features.2.conv.1.0``.  Activation and weight qparams
come from calibration photos; the quantized op then runs on held-out photos (and on the same
inputs x2, beyond the calibrated range) on a real non-VNNI kernel, next to the saturating
emulator, the exact emulator and a float simulation of the same quantized op.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .repair import sqnr

SETUPS = ("torch x86 default", "full-range 8-bit", "7-bit weights", "safeobs")
LAYERS = ("features.0.0", "features.2.conv.1.0")
SCENARIOS = ("held-out", "held-out x2")
ENGINE, ISA = "fbgemm", "avx2"  # x86 == fbgemm on non-VNNI CPUs; fbgemm also when ISA is only forced down


def qconfigs() -> dict:
    """The four setups' QConfigs (activation observer, weight observer)."""
    from torch.ao.quantization import HistogramObserver, PerChannelMinMaxObserver, QConfig, get_default_qconfig

    from ..torch_ao.qconfig import get_default_qconfig as safe_qconfig

    full = HistogramObserver.with_args(reduce_range=False)
    seven = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-64, quant_max=63
    )
    return {
        "torch x86 default": get_default_qconfig("x86"),  # 7-bit activations, per-channel min-max weights
        "full-range 8-bit": get_default_qconfig("onednn"),  # 8-bit activations, same weights
        "7-bit weights": QConfig(activation=full, weight=seven),
        "safeobs": safe_qconfig("x86"),
    }


def real_kernel_mode() -> str | None:
    """The fastest mode that runs a real AVX2 CPU's kernels here: native on AVX2 hosts, else forced AVX2
    (the demo's stem and depthwise convs have no FBGEMM groupwise path), else qemu Haswell (None: none)."""
    from ..kernels import realkernel

    return realkernel.mode_for("avx2", ENGINE)


def _fused_layers(model) -> dict:
    """name -> (fused float conv module, function giving its float input from photos)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    stem = fuse_conv_bn_eval(model.features[0][0], model.features[0][1])
    blk = model.features[2].conv
    dw = fuse_conv_bn_eval(blk[1][0], blk[1][1])

    def dw_input(x):
        return blk[0](model.features[1](model.features[0](x)))

    return {LAYERS[0]: (stem, lambda x: x), LAYERS[1]: (dw, dw_input)}


def _pick(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` crops spread evenly over every source photo of a split (deterministic)."""
    idx = np.linspace(0, len(x) - 1, num=min(n, len(x))).round().astype(int)
    return x[np.unique(idx)]


def _qparams(obs_factory, t: torch.Tensor):
    obs = obs_factory()
    obs(t)
    s, z = obs.calculate_qparams()
    return obs, s, z


def _setup_case(conv, x_cal, y_cal, qconfig) -> dict:
    """Calibrated quantization of one layer: activation/output qparams, weight codes, bias."""
    w = conv.weight.detach()
    aobs, xs, xz = _qparams(qconfig.activation, x_cal)
    _, ys, yz = _qparams(qconfig.activation, y_cal)
    _, ws, wz = _qparams(qconfig.weight, w)
    qw = torch.quantize_per_channel(w, ws.double(), wz.long(), 0, torch.qint8)
    stock = torch.ao.quantization.PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    _, s0, _ = _qparams(lambda: stock, w)
    lost = np.log2(np.maximum(ws.numpy() / s0.numpy(), 1.0))
    return {
        "x_scale": float(xs),
        "x_zp": int(xz),
        "y_scale": float(ys),
        "y_zp": int(yz),
        "w": qw.int_repr().numpy(),
        "w_scale": ws.numpy().astype(np.float64),
        "w_zp": wz.numpy().astype(np.int64),
        "bias": conv.bias.detach().numpy().astype(np.float32),
        "stride": tuple(conv.stride),
        "padding": tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
        "act_bits": 7 if aobs.quant_max - aobs.quant_min < 255 else 8,
        "weight_sqnr_db": sqnr(w.numpy(), qw.dequantize().numpy()),
        "bits_kept_min": float(8 - lost.max()),
        "bits_kept_mean": float(8 - lost.mean()),
    }


def _simulate(case: dict, xq: np.ndarray) -> np.ndarray:
    """The forum's float simulation: dequantized input and weight, float conv, requantize (codes)."""
    x = (xq.astype(np.float32) - case["x_zp"]) * np.float32(case["x_scale"])
    w = (case["w"].astype(np.float32) - case["w_zp"].reshape(-1, 1, 1, 1).astype(np.float32)) * case["w_scale"].astype(
        np.float32
    ).reshape(-1, 1, 1, 1)
    y = F.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(w),
        torch.from_numpy(case["bias"]),
        case["stride"],
        case["padding"],
        case["dilation"],
        case["groups"],
    ).numpy()
    return np.clip(np.rint(y / np.float32(case["y_scale"])) + case["y_zp"], 0, 255).astype(np.uint8)


def run(
    quick: bool = False, calib: int | None = None, evaluate: int | None = None, mode: str | None = "auto", progress=None
) -> dict:
    """Run the demo; returns ``{"mode", "engine", "isa", "calib", "eval", "rows": [...]}`` (one row per
    layer, scenario and setup).  ``mode``: a :mod:`safeobs.kernels.realkernel` mode, "auto" or None (no real kernel)."""
    from .. import data
    from ..data import models
    from ..kernels import emulator, realkernel

    calib = calib or (6 if quick else 24)
    evaluate = evaluate or (2 if quick else 12)
    if mode == "auto":
        mode = real_kernel_mode()
    step = [0]
    total = 4 + (mode is not None)

    def tick(label):
        step[0] += 1
        if progress:
            progress(step[0], total, label)

    torch.manual_seed(0)
    model = models.mobilenet_v2_demo()  # the layers it needs ship inside safeobs: no weights wheel
    x_cal, x_eval = _pick(data.photos("calib"), calib), _pick(data.photos("heldout"), evaluate)
    tick("photos and model")
    cases, meta = [], []
    with torch.no_grad():
        for lname, (conv, feed) in _fused_layers(model).items():
            a_cal, a_eval = feed(x_cal), feed(x_eval)
            y_cal = conv(a_cal)
            for sname, qc in qconfigs().items():
                case = _setup_case(conv, a_cal, y_cal, qc)
                for scen, factor in zip(SCENARIOS, (1.0, 2.0)):
                    a = a_eval * factor
                    xq = torch.quantize_per_tensor(a, case["x_scale"], case["x_zp"], torch.quint8).int_repr().numpy()
                    cases.append(dict(case, op="conv2d", x=xq, relu=False))
                    meta.append({"layer": lname, "scenario": scen, "setup": sname, "float": conv(a).numpy()})
    tick("calibration")
    emu = [emulator.run_case(c, engine=ENGINE, isa=ISA, want_saturation=True) for c in cases]
    exact = [emulator.run_case(c, engine=ENGINE, isa=ISA, exact=True) for c in cases]
    tick("emulator")
    real = realkernel.run_ops(cases, mode=mode, engine=ENGINE) if mode else [None] * len(cases)
    if mode:
        tick(f"real kernel ({mode})")
    rows = []
    for c, m, (ye, sat), yx, yr in zip(cases, meta, emu, exact, real):
        ys, yz = c["y_scale"], c["y_zp"]
        sim = _simulate(c, c["x"])
        out = yr if yr is not None else ye
        deq = (out.astype(np.float32) - yz) * np.float32(ys)
        rows.append(
            {
                "layer": m["layer"],
                "scenario": m["scenario"],
                "setup": m["setup"],
                "act_bits": c["act_bits"],
                "bits_kept_min": c["bits_kept_min"],
                "bits_kept_mean": c["bits_kept_mean"],
                "weight_sqnr_db": c["weight_sqnr_db"],
                "outputs": int(out.size),
                "saturated_outputs": int(np.count_nonzero(out != yx)),
                "saturated_lanes": int(sat.count),
                "op_error": float(np.abs(out.astype(np.int64) - sim).max() * ys),
                "op_error_lsb": int(np.abs(out.astype(np.int64) - sim).max()),
                "output_sqnr_db": sqnr(m["float"], deq),
                "real_equals_emulator": None if yr is None else bool(np.array_equal(yr, ye)),
                "real_equals_exact": None if yr is None else bool(np.array_equal(yr, yx)),
            }
        )
    tick("compare")
    return {"mode": mode, "engine": ENGINE, "isa": ISA, "calib": len(x_cal), "eval": len(x_eval), "rows": rows}


def format_demo(result: dict) -> str:
    """The demo's tables, one per layer."""
    mode = result["mode"]
    src = f"real kernel: {result['engine']} {mode}" if mode else "no real kernel available: emulator output"
    lines = [
        f"Quantized Conv2d op bad output, reproduced on MobileNetV2 ImageNet weights "
        f"({result['calib']} calibration / {result['eval']} held-out photos; {src})",
        "",
    ]
    head = [
        "scenario",
        "setup",
        "act bits",
        "w bits kept",
        "w SQNR",
        "saturated",
        "sat lanes",
        "op err",
        "out SQNR",
        "real==emu",
    ]
    for layer in dict.fromkeys(r["layer"] for r in result["rows"]):
        rows = []
        for r in result["rows"]:
            if r["layer"] != layer:
                continue
            eq = "n/a" if r["real_equals_emulator"] is None else ("yes" if r["real_equals_emulator"] else "NO")
            rows.append(
                [
                    r["scenario"],
                    r["setup"],
                    str(r["act_bits"]),
                    f"{r['bits_kept_min']:.2f}/{r['bits_kept_mean']:.2f}",
                    f"{r['weight_sqnr_db']:.1f} dB",
                    f"{r['saturated_outputs']}/{r['outputs']}",
                    str(r["saturated_lanes"]),
                    f"{r['op_error']:.3g} ({r['op_error_lsb']})",
                    f"{r['output_sqnr_db']:.1f} dB",
                    eq,
                ]
            )
        widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
        fmt = lambda row: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
        lines += [f"{layer}:", fmt(head), "  ".join("-" * w for w in widths)] + [fmt(x) for x in rows] + [""]
    lines += [
        "saturated: outputs whose code differs from the exact (non-saturating) reference; sat lanes: int16 lanes",
        "that saturate (emulator).  op err: max |real - simulated| (dequantized input and weight, float conv,",
        "requantize), in output units (LSB).  w bits kept: 8 - bits lost vs torch's min-max scale (worst/mean",
        "channel).  out SQNR: dequantized output vs the float layer.  x2: inputs twice the calibrated range.",
    ]
    return "\n".join(lines)
