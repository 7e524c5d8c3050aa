"""Emulator speed vs a numpy float64 matmul of the same GEMM and vs the real torch op (native, in-process).

Each row is timed side by side in one run (best of N).  "Bit-exact" compares the emulator with
isa=host (engine fbgemm) to the real op of this host.  Three data sets, same seven GEMM shapes:

* ``real`` (headline): real weights -- all-MiniLM-L6-v2 Linears of encoder layer ``LAYER``, MobileNetV2
  convs with BatchNorm folded (``fuse_conv_bn_weights``) -- quantized with torch's per-channel
  symmetric min-max observer (x86 default), and real activations: the float input the layer sees on
  real data (MiniLM on ``safeobs.data.sentences()``, first 128 non-padding tokens; MobileNetV2 on
  ``safeobs.data.photos("calib")[:1]``), quantized per-tensor to quint8 with a min-max range.
  Output scale/zero point from the min-max range of the float layer output.
* ``real-w, uniform-x`` (stress): the same real weights, activations uniform-random in [0, 255].
* ``worst case`` (adversarial): uniform-random full-range weight codes (~1/4 of the pairs can
  saturate) and uniform-random activations.

Writes benchmarks/results/emulator.{md,png}.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # 1 thread everywhere: fair ratios
    os.environ[_v] = "1"

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from safeobs import data, emulator
from safeobs.data import models
from safeobs.kernels import realkernel  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
OUT = Path(__file__).resolve().parent / "results"
RNG = np.random.default_rng(0)
LAYER = 3  # MiniLM encoder layer whose Linears are benchmarked
TOKENS = 128
KINDS = ("real", "real-w, uniform-x", "worst case")

# name, op, input shape, weight shape, conv kwargs, where the real layer lives
ROWS = [
    ("MiniLM 384->384 (128 tok)", "linear", (TOKENS, 384), (384, 384), {}, "attention.self.query"),
    ("MiniLM 384->1536 (128 tok)", "linear", (TOKENS, 384), (1536, 384), {}, "intermediate.dense"),
    ("MiniLM 1536->384 (128 tok)", "linear", (TOKENS, 1536), (384, 1536), {}, "output.dense"),
    (
        "MBv2 stem 3->32 3x3 s2 224^2",
        "conv2d",
        (1, 3, 224, 224),
        (32, 3, 3, 3),
        dict(stride=2, padding=1),
        "features.0",
    ),
    ("MBv2 pw 144->24 56^2", "conv2d", (1, 144, 56, 56), (24, 144, 1, 1), {}, "features.3.conv.2"),
    (
        "MBv2 dw 3x3 144ch 56^2",
        "conv2d",
        (1, 144, 56, 56),
        (144, 1, 3, 3),
        dict(padding=1, groups=144),
        "features.3.conv.1",
    ),
    ("MBv2 960->160 1x1 7^2", "conv2d", (1, 960, 7, 7), (160, 960, 1, 1), {}, "features.15.conv.2"),
]


def best(fn, reps=5):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


# -- real layers -------------------------------------------------------------------------------------


def _minmax_qparams(t):
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.quint8)
    obs(t)
    s, z = obs.calculate_qparams()
    return float(s), int(z)


def _weight_q(w):
    obs = torch.ao.quantization.default_per_channel_weight_observer()
    obs(w)
    s, z = obs.calculate_qparams()
    return torch.quantize_per_channel(w, s.double(), z, 0, torch.qint8)


def _capture(model, names, run):
    """Float input and output of each named module during ``run()``."""
    got = {}

    def hook(name):
        def f(mod, inp, out):
            got.setdefault(name, (inp[0].detach(), out.detach()))  # returns None: output unchanged

        return f

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()
    return got


def real_layers():
    """name -> (float input, float weight, float bias, float output) of the real layer."""
    out = {}
    m = models.minilm()
    tok = models.tokenizer()
    b = tok(list(data.sentences("calib")[:16]))
    prefix = f"encoder.layer.{LAYER}."
    lin = [r for r in ROWS if r[1] == "linear"]
    got = _capture(m, [prefix + r[5] for r in lin], lambda: m(b["input_ids"], b["attention_mask"]))
    keep = b["attention_mask"].reshape(-1).bool()
    for name, _, xs, _, _, where in lin:
        x, y = got[prefix + where]
        x, y = x.reshape(-1, x.shape[-1])[keep][: xs[0]], y.reshape(-1, y.shape[-1])[keep][: xs[0]]
        mod = m.get_submodule(prefix + where)
        out[name] = (x, mod.weight.detach(), mod.bias.detach(), y)
    mb = models.mobilenet_v2()
    img = data.photos("calib")[:1]
    conv = [r for r in ROWS if r[1] == "conv2d"]
    seqs = {r[5]: mb.get_submodule(r[5]) for r in conv}
    names = [r[5] + ".0" if isinstance(seqs[r[5]], torch.nn.Sequential) else r[5] for r in conv]
    got = _capture(mb, names, lambda: mb(img))
    for (name, _, _, _, kw, where), cname in zip(conv, names):
        x = got[cname][0]
        if isinstance(seqs[where], torch.nn.Sequential):
            c, bn = seqs[where][0], seqs[where][1]
        else:  # projection conv: the BatchNorm is the next module of the block
            blk = mb.get_submodule(where.rsplit(".", 1)[0])
            c, bn = seqs[where], blk[int(where.rsplit(".", 1)[1]) + 1]
        w, bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
            c.weight, c.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        w, bias = w.detach(), bias.detach()
        y = torch.nn.functional.conv2d(x, w, bias, c.stride, c.padding, c.dilation, c.groups)
        out[name] = (x, w, bias, y)
    return out


# -- cases -----------------------------------------------------------------------------------------


def case(kind, row, real):
    """(xq, wq, bias, y_scale, y_zp) for one data set and shape."""
    name, op, xs, ws, kw, _ = row
    if kind == "worst case":
        x = RNG.integers(0, 256, xs).astype(np.uint8)
        w = RNG.integers(-128, 128, ws).astype(np.int8)
        scale = RNG.uniform(1e-3, 1e-2, ws[0])
        xq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), 0.02, 30)
        wq = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(w), torch.from_numpy(scale), torch.zeros(ws[0], dtype=torch.long), 0
        )
        return xq, wq, torch.randn(ws[0]), 4.0, 64
    xf, w, bias, y = real[name]
    assert tuple(xf.shape) == xs and tuple(w.shape) == ws, (name, xf.shape, w.shape)
    wq = _weight_q(w)
    xsc, xzp = _minmax_qparams(xf)
    if kind == "real":
        xq = torch.quantize_per_tensor(xf, xsc, xzp, torch.quint8)
    else:
        x = RNG.integers(0, 256, xs).astype(np.uint8)
        xq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), xsc, xzp)
    ysc, yzp = _minmax_qparams(y)
    return xq, wq, bias.float(), ysc, yzp


def gemm_operands(op, xshape, wshape, kw):
    """float64 operands of the same grouped GEMM (M x K x N per group)."""
    if op == "linear":
        return np.ones((xshape[0], xshape[1])), np.ones((wshape[1], wshape[0]))
    g = kw.get("groups", 1)
    n, c, h, w_ = xshape
    s, p = kw.get("stride", 1), kw.get("padding", 0)
    oh, ow = (h + 2 * p - wshape[2]) // s + 1, (w_ + 2 * p - wshape[3]) // s + 1
    kg = wshape[1] * wshape[2] * wshape[3]
    return np.ones((g, n * oh * ow, kg)), np.ones((g, kg, wshape[0] // g))


def main():
    isa = realkernel.host_isa()
    real = real_layers()
    rows = []
    for kind in KINDS:
        for row in ROWS:
            name, op, xs, ws, kw, _ = row
            xq, wq, bias, ysc, yzp = case(kind, row, real)
            stride, pad, groups = kw.get("stride", 1), kw.get("padding", 0), kw.get("groups", 1)
            if op == "linear":
                packed = torch.ops.quantized.linear_prepack(wq, bias)
                real_op = lambda: torch.ops.quantized.linear(xq, packed, ysc, yzp)  # noqa: E731
                args = (xq, wq, bias, ysc, yzp)
            else:
                packed = torch.ops.quantized.conv2d_prepack(wq, bias, [stride] * 2, [pad] * 2, [1, 1], groups)
                real_op = lambda: torch.ops.quantized.conv2d(xq, packed, ysc, yzp)  # noqa: E731
                args = (xq, wq, bias, stride, pad, 1, groups, "zeros", ysc, yzp)
            fn = emulator.linear if op == "linear" else emulator.conv2d
            emu = lambda: fn(*args, engine="fbgemm", isa=isa)  # noqa: E731
            a, b = gemm_operands(op, xs, ws, kw)
            t_mm = best(lambda: np.matmul(a, b))
            t_emu, t_real = best(emu, 5), best(real_op)
            exact = np.array_equal(emu().int_repr().numpy(), real_op().int_repr().numpy())
            sat = emulator.saturation(op, *args, engine="fbgemm", isa=isa).count
            rows.append((kind, name, t_emu, t_mm, t_real, exact, sat))
            print(
                f"{kind:18s} {name:30s} emu {t_emu * 1e3:8.2f} ms  matmul {t_mm * 1e3:7.2f} ms  torch "
                f"{t_real * 1e3:7.2f} ms  emu/matmul {t_emu / t_mm:6.2f}  emu/torch {t_emu / t_real:6.1f}  exact {exact}"
                f"  sat {sat}",
                flush=True,
            )
    write(rows, isa)
    return 0 if all(r[5] for r in rows) else 1


def write(rows, isa):
    OUT.mkdir(exist_ok=True)
    lines = [
        f"# Emulator benchmark\n\nHost ISA: `{isa}`, engine fbgemm, 1 thread, best of several runs, "
        f"torch {torch.__version__}, numpy {np.__version__}.  Target: emulator <= 3x the float64 matmul "
        f"of the same GEMM, bit-exact.  Generated by `benchmarks/bench_emulator.py` (data sets in its "
        f"docstring).\n"
    ]
    titles = {
        "real": "## Real weights, real activations (headline)",
        "real-w, uniform-x": "## Real weights, uniform-random activations (stress)",
        "worst case": "## Worst case: uniform-random weights and activations (adversarial)",
    }
    for kind in KINDS:
        sel = [r for r in rows if r[0] == kind]
        ratios = [r[2] / r[3] for r in sel]
        lines += [
            "",
            titles[kind],
            "",
            "| shape | emulator ms | float64 matmul ms | torch op ms | emu / matmul | emu / torch "
            "| bit-exact | saturated lanes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, name, te, tm, tr, ex, sat in sel:
            lines.append(
                f"| {name} | {te * 1e3:.2f} | {tm * 1e3:.2f} | {tr * 1e3:.2f} | {te / tm:.2f} | {te / tr:.1f} "
                f"| {'yes' if ex else 'NO'} | {sat} |"
            )
        lines.append(
            f"\nemu / matmul: {min(ratios):.2f}-{max(ratios):.2f}x "
            f"({sum(x <= 3 for x in ratios)}/{len(ratios)} rows within 3x)."
        )
    (OUT / "emulator.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping emulator.png")
        return
    fig, ax = plt.subplots(figsize=(10, 4.8))
    names = [r[1] for r in ROWS]
    idx = np.arange(len(names))
    wdt = 0.8 / len(KINDS)
    for i, kind in enumerate(KINDS):
        ax.bar(idx + (i - (len(KINDS) - 1) / 2) * wdt, [r[2] / r[3] for r in rows if r[0] == kind], wdt, label=kind)
    ax.axhline(3, color="k", ls="--", lw=1, label="target 3x")
    ax.set_yscale("log")
    ax.set_xticks(idx, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("emulator time / float64 matmul time")
    ax.set_title(
        f"safeobs emulator vs float64 matmul of the same GEMM (host {isa}, all rows bit-exact)"
        if all(r[5] for r in rows)
        else f"safeobs emulator vs float64 matmul (host {isa})"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "emulator.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
