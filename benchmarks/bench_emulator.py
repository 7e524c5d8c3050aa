"""Emulator speed vs a numpy float64 matmul of the same GEMM and vs the real torch op (native, in-process).

Each row is timed side by side in one run (best of N).  "Bit-exact" compares the emulator with
isa=host (engine fbgemm) to the real op of this host.  Weights: "uniform" = random full-range codes
(worst case, ~1/4 of pairs are correction candidates); "gaussian" = per-channel quantized normal
weights (realistic: few pairs reach |w0+w1| >= 129).  Writes benchmarks/results/emulator.{md,png}.
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
from safeobs import emulator, realkernel  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
torch.backends.quantized.engine = "fbgemm"
OUT = Path(__file__).resolve().parent / "results"
RNG = np.random.default_rng(0)

# name, op, input shape, weight shape, conv kwargs
ROWS = [
    ("MiniLM 384->384 (128 tok)", "linear", (128, 384), (384, 384), {}),
    ("MiniLM 384->1536 (128 tok)", "linear", (128, 384), (1536, 384), {}),
    ("MiniLM 1536->384 (128 tok)", "linear", (128, 1536), (384, 1536), {}),
    ("MBv2 stem 3->32 3x3 s2 224^2", "conv2d", (1, 3, 224, 224), (32, 3, 3, 3), dict(stride=2, padding=1)),
    ("MBv2 pw 144->24 56^2", "conv2d", (1, 144, 56, 56), (24, 144, 1, 1), {}),
    ("MBv2 dw 3x3 144ch 56^2", "conv2d", (1, 144, 56, 56), (144, 1, 3, 3), dict(padding=1, groups=144)),
    ("MBv2 960->160 1x1 7^2", "conv2d", (1, 960, 7, 7), (160, 960, 1, 1), {}),
]


def best(fn, reps=5):
    fn()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return min(t)


def weights(shape, kind):
    if kind == "uniform":
        return RNG.integers(-128, 128, shape).astype(np.int8), RNG.uniform(1e-3, 1e-2, shape[0])
    w = RNG.normal(0, 1, shape)
    scale = np.abs(w.reshape(shape[0], -1)).max(1) / 127
    return np.rint(w / scale.reshape((-1,) + (1,) * (len(shape) - 1))).astype(np.int8), scale


def gemm_operands(op, xshape, wshape, kw):
    """float64 operands of the same grouped GEMM (M x K x N per group)."""
    if op == "linear":
        return [(np.ones((xshape[0], xshape[1])), np.ones((wshape[1], wshape[0])))]
    g = kw.get("groups", 1)
    n, c, h, w_ = xshape
    s, p = kw.get("stride", 1), kw.get("padding", 0)
    oh, ow = (h + 2 * p - wshape[2]) // s + 1, (w_ + 2 * p - wshape[3]) // s + 1
    kg = wshape[1] * wshape[2] * wshape[3]
    a = np.ones((g, n * oh * ow, kg))
    b = np.ones((g, kg, wshape[0] // g))
    return [(a, b)]


def main():
    isa = realkernel.host_isa()
    rows = []
    for kind in ("uniform", "gaussian"):
        for name, op, xs, ws, kw in ROWS:
            x = RNG.integers(0, 256, xs).astype(np.uint8)
            w, scale = weights(ws, kind)
            xq = torch._make_per_tensor_quantized_tensor(torch.from_numpy(x), 0.02, 30)
            wq = torch._make_per_channel_quantized_tensor(torch.from_numpy(w), torch.from_numpy(scale),
                                                          torch.zeros(ws[0], dtype=torch.long), 0)
            bias = torch.randn(ws[0])
            if op == "linear":
                packed = torch.ops.quantized.linear_prepack(wq, bias)
                real = lambda: torch.ops.quantized.linear(xq, packed, 4.0, 64)  # noqa: E731
                emu = lambda: emulator.linear(xq, wq, bias, 4.0, 64, engine="fbgemm", isa=isa)  # noqa: E731
            else:
                packed = torch.ops.quantized.conv2d_prepack(wq, bias, [kw.get("stride", 1)] * 2,
                                                            [kw.get("padding", 0)] * 2, [1, 1], kw.get("groups", 1))
                real = lambda: torch.ops.quantized.conv2d(xq, packed, 4.0, 64)  # noqa: E731
                emu = lambda: emulator.conv2d(xq, wq, bias, kw.get("stride", 1), kw.get("padding", 0), 1,  # noqa: E731
                                              kw.get("groups", 1), "zeros", 4.0, 64, engine="fbgemm", isa=isa)
            (a, b), = gemm_operands(op, xs, ws, kw)
            t_mm = best(lambda: np.matmul(a, b))
            t_emu, t_real = best(emu, 3), best(real)
            exact = np.array_equal(emu().int_repr().numpy(), real().int_repr().numpy())
            sat = emulator.saturation("linear" if op == "linear" else "conv2d", *(
                (xq, wq, bias, 4.0, 64) if op == "linear" else
                (xq, wq, bias, kw.get("stride", 1), kw.get("padding", 0), 1, kw.get("groups", 1), "zeros", 4.0, 64)),
                engine="fbgemm", isa=isa).count
            rows.append((kind, name, t_emu, t_mm, t_real, exact, sat))
            print(f"{kind:8s} {name:30s} emu {t_emu*1e3:8.2f} ms  matmul {t_mm*1e3:8.2f} ms  torch {t_real*1e3:8.2f} ms"
                  f"  emu/matmul {t_emu/t_mm:5.2f}  emu/torch {t_emu/t_real:6.1f}  exact {exact}  sat {sat}", flush=True)
    OUT.mkdir(exist_ok=True)
    lines = [f"# Emulator benchmark\n\nHost ISA: `{isa}`, engine fbgemm, 1 thread, best of several runs, "
             f"torch {torch.__version__}, numpy {np.__version__}.\n",
             "| weights | shape | emulator ms | float64 matmul ms | torch op ms | emu / matmul | emu / torch "
             "| bit-exact | saturated lanes |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, name, te, tm, tr, ex, sat in rows:
        lines.append(f"| {kind} | {name} | {te*1e3:.2f} | {tm*1e3:.2f} | {tr*1e3:.2f} | {te/tm:.2f} | {te/tr:.1f} "
                     f"| {'yes' if ex else 'NO'} | {sat} |")
    (OUT / "emulator.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping emulator.png")
        return 0
    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [r[1] for r in rows if r[0] == "uniform"]
    idx = np.arange(len(names))
    for i, kind in enumerate(("uniform", "gaussian")):
        ax.bar(idx + (i - 0.5) * 0.4, [r[2] / r[3] for r in rows if r[0] == kind], 0.4, label=f"{kind} weights")
    ax.axhline(3, color="k", ls="--", lw=1, label="target 3x")
    ax.set_xticks(idx, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("emulator time / float64 matmul time")
    ax.set_title(f"safeobs emulator vs float64 matmul of the same GEMM (host {isa})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "emulator.png", dpi=120)
    return 0 if all(r[5] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
