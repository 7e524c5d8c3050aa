"""Emulator speed vs a numpy float64 matmul of the same GEMM, for the saturating AVX2 kernels on every host.

Each row times, side by side in interleaved rounds: the float64 matmul of the same GEMM (M x K x N per group,
operands made beforehand), ``safeobs.emulator`` with ``isa="avx2"`` (FBGEMM's saturating int16 pair sums, the
hard case) and with the host's own ISA, and the real torch op of this host (native, in-process).  Times are
the CPU time of the calling thread (``time.thread_time``), best of the rounds: on a shared host the wall
clock mostly measures the neighbours (wall-clock bests are in the JSON).  1 thread everywhere, and glibc
malloc keeps freed memory (``mallopt``: no timed op pays fresh page faults for its temporaries on every call).

Bit-exactness: the ``avx2`` emulation against the real FBGEMM AVX2 kernels where this host can run them
(``realkernel.mode_for("avx2")``: native on an AVX2 host, forced with ``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` on an
AVX-512 one, else qemu Haswell), all cases of a table in one subprocess; the host-ISA emulation against the
native op.  Data sets:

* ``real`` (headline): real weights -- all-MiniLM-L6-v2 Linears of encoder layer ``LAYER``, MobileNetV2
  convs with BatchNorm folded (``fuse_conv_bn_weights``) -- quantized with torch's per-channel
  symmetric min-max observer (x86 default), and real activations: the float input the layer sees on
  real data (MiniLM on ``safeobs.data.sentences()``, first 128 non-padding tokens; MobileNetV2 on
  ``safeobs.data.photos("calib")[:1]``), quantized per-tensor to quint8 with a min-max range.
  Output scale/zero point from the min-max range of the float layer output.
* ``llama`` (Llama-2-7B shapes, synthetic): q_proj 4096->4096, up_proj 4096->11008, down_proj 11008->4096 at
  M = 1 (decode) and 128 / 256 (prefill) tokens.  Weights Student-t (4 degrees of freedom) x 0.02, quantized
  per channel like the real ones; activations as the layers see them in Llama: RMSNorm outputs with a few
  massive outlier channels (q/up), SiLU(gate) * up products (down), quantized per-tensor with a min-max range.
* ``real-w, uniform-x`` (stress): the real weights, activations uniform-random in [0, 255].
* ``worst case`` (adversarial): uniform-random full-range weight codes (~1/4 of the pairs can
  saturate) and uniform-random activations.

Writes benchmarks/results/emulator.{md,png,json}.
"""

from __future__ import annotations

import ctypes
import json
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
KINDS = ("real", "llama", "real-w, uniform-x", "worst case")
TITLES = {
    "real": "## Real weights, real activations (headline)",
    "llama": "## Llama-2-7B shapes: Student-t weights, Llama-like activations (synthetic)",
    "real-w, uniform-x": "## Real weights, uniform-random activations (stress)",
    "worst case": "## Worst case: uniform-random weights and activations (adversarial)",
}
TARGET = 3.0  # emulator (isa="avx2") <= 3x the float64 matmul of the same GEMM

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
LLAMA = [(4096, 4096, "q_proj"), (4096, 11008, "up_proj"), (11008, 4096, "down_proj")]
LLAMA_ROWS = [
    (f"Llama {name} {k}->{n} (M={m})", "linear", (m, k), (n, k), {}, name)
    for k, n, name in LLAMA
    for m in (1, 128, 256)
]


def keep_freed_memory() -> bool:
    """glibc: never trim the heap, never mmap (up to 1 GiB), so re-allocated temporaries are not page-faulted
    anew on every call (for every timed op alike).  False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-1, 1 << 30) == 1 and libc.mallopt(-3, 1 << 30) == 1  # M_TRIM_, M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def rounds_of(fns, budget_s=1.5, lo=3, hi=100):
    """Interleaved rounds of ``fns``: (best CPU seconds, best wall seconds) per function."""
    t0 = time.perf_counter()
    for f in fns:
        f()
    n = int(np.clip(budget_s / max(time.perf_counter() - t0, 1e-6), lo, hi))
    cpu = [[] for _ in fns]
    wall = [[] for _ in fns]
    for _ in range(n):
        for i, f in enumerate(fns):
            c, w = time.thread_time(), time.perf_counter()
            f()
            cpu[i].append(time.thread_time() - c)
            wall[i].append(time.perf_counter() - w)
    return [min(v) for v in cpu], [min(v) for v in wall]


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


_LLAMA_W: dict = {}  # (K, N) -> (quantized weight, float weight): one shape at a time
_CODES: dict = {}  # id(weight) -> (weight, its codes): rows of one weight share one array (pickled once)


def llama_case(row):
    """(xq, wq, None, y_scale, y_zp) for a Llama-shaped row; the weight of a shape is drawn once."""
    name, _, (m, k), (n, _), _, proj = row
    rng = np.random.default_rng(k * 7 + n)
    if (k, n) not in _LLAMA_W:
        _LLAMA_W.clear()  # one weight (up to 45 M codes) at a time
        w = torch.from_numpy((rng.standard_t(4, (n, k)) * 0.02).astype(np.float32))
        _LLAMA_W[(k, n)] = _weight_q(w), w
    wq, w = _LLAMA_W[(k, n)]
    if proj == "down_proj":  # SiLU(gate) * up
        gate, up = rng.standard_normal((2, m, k)).astype(np.float32)
        x = gate / (1 + np.exp(-gate)) * up
    else:  # RMSNorm output: unit scale, a few massive outlier channels
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, [1415, 2533, 3001]] *= 60.0
    xf = torch.from_numpy(x)
    xsc, xzp = _minmax_qparams(xf)
    ysc, yzp = _minmax_qparams(xf @ w.T)
    return torch.quantize_per_tensor(xf, xsc, xzp, torch.quint8), wq, None, ysc, yzp


def real_case_dict(op, xq, wq, bias, ysc, yzp, kw):
    """The same op as a :mod:`safeobs.kernels.realkernel` case (plain codes)."""
    c = dict(
        op=op,
        x=xq.int_repr().numpy(),
        x_scale=float(xq.q_scale()),
        x_zp=int(xq.q_zero_point()),
        w=_CODES.setdefault(id(wq), (wq, wq.int_repr().numpy()))[1],
        w_scale=wq.q_per_channel_scales().numpy().astype(np.float64),
        w_zp=wq.q_per_channel_zero_points().numpy().astype(np.int64),
        bias=None if bias is None else bias.numpy().astype(np.float32),
        y_scale=float(ysc),
        y_zp=int(yzp),
    )
    if op == "conv2d":
        c.update(stride=kw.get("stride", 1), padding=kw.get("padding", 0), groups=kw.get("groups", 1))
    return c


def run_table(kind, rows, real, host):
    out, cases = [], []
    for row in rows:
        name, op, xs, ws, kw, _ = row
        xq, wq, bias, ysc, yzp = llama_case(row) if kind == "llama" else case(kind, row, real)
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
        emu2 = lambda: fn(*args, engine="fbgemm", isa="avx2")  # noqa: E731
        emuh = lambda: fn(*args, engine="fbgemm", isa=host)  # noqa: E731
        ab = gemm_operands(op, xs, ws, kw)
        (t_mm, t2, th, tr), wall = rounds_of([lambda: np.matmul(*ab), emu2, emuh, real_op])
        ab = None
        y2 = emu2().int_repr().numpy()
        exact_host = bool(np.array_equal(emuh().int_repr().numpy(), real_op().int_repr().numpy()))
        sat = emulator.saturation(op, *args, engine="fbgemm", isa="avx2").count
        r = dict(
            kind=kind,
            name=name,
            matmul=t_mm,
            emu_avx2=t2,
            emu_host=th,
            torch=tr,
            wall=wall,
            exact_host=exact_host,
            sat_avx2=int(sat),
        )
        out.append(r)
        cases.append((real_case_dict(op, xq, wq, bias, ysc, yzp, kw), y2))
        print(
            f"{kind:18s} {name:34s} matmul {t_mm * 1e3:8.2f} ms  avx2 {t2 / t_mm:6.2f}x  {host} {th / t_mm:6.2f}x  "
            f"torch {tr * 1e3:8.2f} ms  host exact {exact_host}  sat {sat}",
            flush=True,
        )
    # the avx2 emulation against the real AVX2 kernels, all cases in one subprocess
    convs = realkernel.case_convs([c for c, _ in cases])
    mode = realkernel.mode_for("avx2", "fbgemm", convs)
    if mode is None:
        for r in out:
            r["exact_avx2"] = None
        return out, "not reachable on this host"
    got = realkernel.run_ops([c for c, _ in cases], mode=mode, engine="fbgemm")
    for r, (_, y2), g in zip(out, cases, got):
        r["exact_avx2"] = bool(np.array_equal(y2, g))
    return out, realkernel.describe(mode, "fbgemm")


def main():
    if sys.argv[1:] == ["--rewrite"]:  # the md and png again from the JSON of the last run
        js = json.loads((OUT / "emulator.json").read_text())
        tables = {k: (v["rows"], v["avx2_checked_against"]) for k, v in js["tables"].items()}
        write(tables, js["host"]["isa"], js["host"]["mallopt"])
        return 0
    kept = keep_freed_memory()
    host = realkernel.host_isa()
    real = real_layers()
    tables = {}
    for kind in KINDS:
        rows, how = run_table(kind, LLAMA_ROWS if kind == "llama" else ROWS, real, host)
        tables[kind] = (rows, how)
        print(f"  avx2 checked against: {how}", flush=True)
    write(tables, host, kept)
    return 0 if all(r["exact_host"] and r["exact_avx2"] is not False for t, _ in tables.values() for r in t) else 1


def _label(how: str, cpu: str) -> str:
    if how.startswith("not"):
        return "not checked (no real AVX2 kernels reachable here)"
    return f"{how}, on this {cpu}"


def write(tables, host, kept):
    OUT.mkdir(exist_ok=True)
    cpu = realkernel.cpu_name()
    lines = [
        "# Emulator benchmark\n",
        f'Host: {cpu}, ISA `{host}` (its own kernels: "{host} (native)"), engine fbgemm, 1 thread, torch '
        f"{torch.__version__}, numpy {np.__version__}.  Times: CPU time of the calling thread, best of interleaved "
        f'rounds{"; glibc malloc keeps freed memory (mallopt)" if kept else ""}.  **Target: the `isa="avx2"` '
        f"emulation (FBGEMM's saturating int16 pair sums) <= {TARGET:g}x the float64 matmul of the same GEMM on "
        'every row of the headline table.**  "avx2 bit-exact" compares it with the real FBGEMM AVX2 kernels '
        f'(how, per table below); "{host} bit-exact" compares the `isa="{host}"` emulation with this host\'s '
        "native op.  Generated by `benchmarks/bench_emulator.py` (data sets in its docstring).",
    ]
    for kind, (rows, how) in tables.items():
        r2 = [r["emu_avx2"] / r["matmul"] for r in rows]
        lines += [
            "",
            TITLES[kind],
            "",
            f"AVX2 kernels checked: {_label(how, cpu)}.",
            "",
            f"| shape | float64 matmul ms | emu avx2 ms | **avx2 / matmul** | emu {host} ms | {host} / matmul "
            f"| torch op ms ({host}) | avx2 bit-exact | {host} bit-exact | saturated lanes (avx2) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ex2 = {True: "yes", False: "**NO**", None: "n/a"}[r["exact_avx2"]]
            lines.append(
                f"| {r['name']} | {r['matmul'] * 1e3:.2f} | {r['emu_avx2'] * 1e3:.2f} | "
                f"**{r['emu_avx2'] / r['matmul']:.2f}** | {r['emu_host'] * 1e3:.2f} | "
                f"{r['emu_host'] / r['matmul']:.2f} | {r['torch'] * 1e3:.2f} | {ex2} | "
                f"{'yes' if r['exact_host'] else '**NO**'} | {r['sat_avx2']} |"
            )
        lines.append(
            f"\navx2 / matmul: {min(r2):.2f}-{max(r2):.2f}x ({sum(x <= TARGET for x in r2)}/{len(r2)} rows within "
            f"{TARGET:g}x)."
        )
    (OUT / "emulator.md").write_text("\n".join(lines) + "\n")
    js = {
        "host": {"cpu": cpu, "isa": host, "torch": torch.__version__, "numpy": np.__version__, "mallopt": kept},
        "tables": {k: {"avx2_checked_against": how, "rows": rows} for k, (rows, how) in tables.items()},
    }
    (OUT / "emulator.json").write_text(json.dumps(js, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping emulator.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.2), gridspec_kw=dict(width_ratios=[len(ROWS), len(LLAMA_ROWS)]))
    for ax, kinds, names in (
        (axes[0], [k for k in tables if k != "llama"], [r[0] for r in ROWS]),
        (axes[1], ["llama"], [r[0].replace("Llama ", "") for r in LLAMA_ROWS]),
    ):
        idx = np.arange(len(names))
        wdt = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            vals = [r["emu_avx2"] / r["matmul"] for r in tables[kind][0]]
            ax.bar(idx + (i - (len(kinds) - 1) / 2) * wdt, vals, wdt, label=f"{kind} (isa=avx2)")
        ax.axhline(TARGET, color="k", ls="--", lw=1, label=f"target {TARGET:g}x")
        ax.set_yscale("log")
        ax.set_xticks(idx, names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("emulator CPU time / float64 matmul CPU time")
        ax.legend(fontsize=7)
    fig.suptitle(f"safeobs emulator, saturating isa='avx2', vs float64 matmul of the same GEMM (host: {cpu}, {host})")
    fig.tight_layout()
    fig.savefig(OUT / "emulator.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
