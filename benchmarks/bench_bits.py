"""Bits lost per output channel by provably safe weight scales, on real MiniLM and MobileNetV2 weights.

Every Linear/Conv weight (MobileNetV2 with BatchNorm folded as FX fusion folds it), per-channel
symmetric qint8.  Bits lost per channel = log2(scale / torch's min-max scale).  Writes
benchmarks/results/bits.md and bits.png.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.ao.quantization.observer import PerChannelMinMaxObserver
from torch.nn.utils.fusion import fuse_conv_bn_weights

from safeobs.core.solver import safe_qparams
from safeobs.data import models
from safeobs.kernels import realkernel
from safeobs.tools.verify import verify
from safeobs.torch_ao.observers import SafePerChannelMinMaxObserver

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parent / "results"
LAYOUTS = ("fbgemm", "onednn", "x86", "any")
PCTS = (50, 90, 99, 100)


def model_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, float weight) of every Linear/Conv; a Conv directly followed by BatchNorm is folded."""
    out, folded = [], set()
    for parent_name, parent in model.named_modules():
        kids = list(parent.named_children())
        for (n1, m1), (_, m2) in zip(kids, kids[1:]):
            if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d):
                w, _ = fuse_conv_bn_weights(
                    m1.weight, m1.bias, m2.running_mean, m2.running_var, m2.eps, m2.weight, m2.bias
                )
                name = f"{parent_name}.{n1}".lstrip(".")
                out.append((name, w.detach().float()))
                folded.add(name)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in folded:
            out.append((name, m.weight.detach().float()))
    return out


def stock_scale(w: torch.Tensor, qmin=-128, qmax=127) -> torch.Tensor:
    obs = PerChannelMinMaxObserver(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=qmin, quant_max=qmax
    )
    obs(w)
    return obs.calculate_qparams()[0]


def sqnr(weights, scales) -> float:
    sig = err = 0.0
    for w, s in zip(weights, scales):
        q = torch.quantize_per_channel(w, s.double(), torch.zeros(len(s), dtype=torch.long), 0, torch.qint8)
        sig += float((w.double() ** 2).sum())
        err += float(((q.dequantize().double() - w.double()) ** 2).sum())
    return 10 * np.log10(sig / err)


def evaluate(label: str, named):
    weights = [w for _, w in named]
    stock = [stock_scale(w) for w in weights]
    channels = sum(len(s) for s in stock)
    rows, bits = [], {}
    # torch min-max: which channels can saturate under each layout
    share = {}
    for lay in LAYOUTS:
        bad = 0
        for w, s in zip(weights, stock):
            q = torch.quantize_per_channel(w, s.double(), torch.zeros(len(s), dtype=torch.long), 0, torch.qint8)
            bad += len({v.channel for v in verify(q, lay)})
        share[lay] = bad / channels
    rows.append(("torch min-max (unsafe)", np.zeros(channels), sqnr(weights, stock)))
    seven = [stock_scale(w, -64, 63) for w in weights]
    rows.append(
        (
            "7-bit weights [-64, 63]",
            np.concatenate([np.log2((a / b).numpy()) for a, b in zip(seven, stock)]),
            sqnr(weights, seven),
        )
    )
    for lay in LAYOUTS:
        safe = [safe_qparams(w, layout=lay)[0] for w in weights]
        for w, s in zip(weights, safe):
            q = torch.quantize_per_channel(w, s.double(), torch.zeros(len(s), dtype=torch.long), 0, torch.qint8)
            assert verify(q, lay).ok, f"{label}: unsafe result for layout {lay}"
        b = np.concatenate([np.log2((a / c).numpy()) for a, c in zip(safe, stock)])
        bits[lay] = b
        rows.append((f"safeobs layout={lay}", b, sqnr(weights, safe)))
    return dict(label=label, layers=len(weights), channels=channels, share=share, rows=rows, bits=bits)


def observer_timing(named, repeats: int = 7):
    """forward + calculate_qparams over all layers: torch's observer vs ours.  The first call of ours
    (cold: nothing cached) is measured first in a fresh process; warm runs then alternate with torch's
    so that both see the same machine load; best of ``repeats`` each."""

    def run(cls):
        t0 = time.perf_counter()
        for _, w in named:
            o = cls(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
            o(w)
            o.calculate_qparams()
        return time.perf_counter() - t0

    cold_safe = run(SafePerChannelMinMaxObserver)
    cold_torch = run(PerChannelMinMaxObserver)
    t_torch, t_safe = [], []
    for _ in range(repeats):
        t_torch.append(run(PerChannelMinMaxObserver))
        t_safe.append(run(SafePerChannelMinMaxObserver))
    return min(t_torch), min(t_safe), cold_safe, cold_torch


def _timing_subprocess(which: str) -> tuple:
    """observer_timing in a fresh interpreter (so that the first call is really cold)."""
    import json
    import subprocess

    code = (
        f"import sys, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); import bench_bits as b; "
        f"from safeobs import models; m = getattr(models, {which!r})().eval(); "
        "print(json.dumps(b.observer_timing(b.model_weights(m))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


WHERE_THE_TIME_GOES = """Where the time goes (profiled): torch's observer is one multi-threaded `aminmax` per weight.  The safe
observer adds (1) one pass over the pair sums of each weight, about 0.6-0.8x of that `aminmax` (in torch for weights
of 64k elements or more, so it scales with cores like torch's), (2) the exact threshold search on the few pairs that
can set a channel's scale: one evaluation of 17 float32 steps around a closed-form estimate, checked, with the
bisection as fallback, and (3) a fixed per-layer cost of numpy calls, about 0.3-0.5 ms.  MobileNetV2's 53 weights are
small (torch needs about 0.4 ms each), so there (3) dominates.  Why the ratio moved 3.5x between hosts with the old
code: its first call built whole pair tables (`np.unique` over millions of pairs, plus numpy's lazy import of
`numpy.ma`) and its search was ~20 bisection steps of single-threaded numpy, while torch's `aminmax` scales with cores.
The tables are now closed-form or built per row and the search is one step, but the fixed per-layer cost does not
scale with cores: on a host with many fast cores expect a higher ratio than here."""


def table(res) -> str:
    lines = [
        f"### {res['label']}: {res['layers']} weights, {res['channels']} output channels",
        "",
        "| configuration | mean bits lost | p50 | p90 | p99 | max | weight SQNR (dB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, b, q in res["rows"]:
        p = np.percentile(b, PCTS)
        lines.append(f"| {name} | {b.mean():.3f} | {p[0]:.3f} | {p[1]:.3f} | {p[2]:.3f} | {p[3]:.3f} | {q:.2f} |")
    lines += [
        "",
        "Share of channels torch's min-max scales leave able to saturate: "
        + ", ".join(f"{lay} {100 * v:.1f}%" for lay, v in res["share"].items()),
        "",
    ]
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4))
    for ax, res in zip(np.atleast_1d(axes), results):
        for lay, b in res["bits"].items():
            xs = np.sort(b)
            ax.plot(xs, np.linspace(0, 1, len(xs)), label=f"{lay} (mean {b.mean():.2f})")
        ax.axvline(1.0, color="k", ls="--", lw=1, label="7-bit / reduce_range (1.0)")
        ax.set(title=res["label"], xlabel="bits lost per output channel", ylabel="share of channels (CDF)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    minilm = model_weights(models.minilm().eval())
    mbv2 = model_weights(models.mobilenet_v2().eval())
    results = [evaluate("MiniLM (all-MiniLM-L6-v2)", minilm), evaluate("MobileNetV2 (BN folded)", mbv2)]
    timing = {name: _timing_subprocess(fn) for name, fn in (("MiniLM", "minilm"), ("MobileNetV2", "mobilenet_v2"))}
    targets = {"MiniLM (all-MiniLM-L6-v2)": 0.36, "MobileNetV2 (BN folded)": 0.42}
    md = [
        "# Bits lost by provably safe weight scales",
        "",
        "Per-channel symmetric qint8.  Bits lost per output channel = log2(scale / torch min-max scale).",
        "torch's min-max scale is the unconstrained floor (it is *not* safe); 7-bit weights are torch's",
        "reduce_range answer.  safeobs scales are the tightest float32 scales proven safe for the layout.",
        "",
    ]
    for res in results:
        md.append(table(res))
        x86 = res["bits"]["x86"].mean()
        md.append(
            f"Target (layout x86): mean <= {targets[res['label']]}: measured {x86:.3f} "
            f"({'met' if x86 <= targets[res['label']] else 'MISSED'}).\n"
        )
    host = realkernel.host_isa()
    md += [
        "### Observer time (forward + calculate_qparams over every weight of the model)",
        "",
        f"Host: {realkernel.cpu_name()}, ISA `{host}`, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads).  Cold = the first call in a fresh process (nothing cached); warm "
        "= best of 7, alternating with torch's observer in the same run.",
        "",
        "| model | torch PerChannelMinMaxObserver (s) | SafePerChannelMinMaxObserver, warm (s) | safe, first call (s) "
        "| ratio warm | ratio first call |",
        "|---|---|---|---|---|---|",
    ]
    worst = 0.0
    for name, (t_torch, t_safe, cold, cold_torch) in timing.items():
        worst = max(worst, t_safe / t_torch, cold / t_torch)
        md.append(
            f"| {name} | {t_torch:.4f} | {t_safe:.4f} | {cold:.4f} | {t_safe / t_torch:.2f} | {cold / t_torch:.2f} |"
        )
    md += [
        "",
        f"Target: at most 3x torch's, first call included: worst ratio {worst:.2f} "
        f"({'met' if worst <= 3 else 'MISSED'}).",
        "",
        WHERE_THE_TIME_GOES,
        "",
    ]
    (OUT / "bits.md").write_text("\n".join(md))
    plot(results, OUT / "bits.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
