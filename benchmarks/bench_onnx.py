"""ONNX Runtime: ORT's quantizer (default, reduce_range, U8U8, x64quantprecision) vs safeobs.onnx.

MiniLM (all-MiniLM-L6-v2, dynamic per-tensor / per-channel, static QDQ U8S8) and MobileNetV2
(static QDQ U8S8 and S8S8), exported with torch.onnx.export, real sentences and photos from
safeobs.data (calibration split for calibration, held-out split for evaluation).

* fidelity: SQNR of the output (MiniLM: mean-pooled embedding; MobileNetV2: logits) against the
  FP32 ONNX model, on this host (real MLAS kernels) and, for the MiniLM dynamic models, under
  qemu Haswell (AVX2 on any host; few sentences: qemu is slow);
* "exact" column: the same model with ``session.x64quantprecision=1`` (ORT's exact U8U8 path), i.e.
  the integer results a VNNI CPU computes (exact accumulation); the AVX2-vs-exact SQNR shows what
  saturation costs; safeobs's models must match it (>= 45 dB; 0 saturated lanes in emulation);
* speed: median run time on this host as a ratio to ORT's U8S8 default, measured in one run.

Writes benchmarks/results/onnx.md and onnx.png.  About 5-8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static  # noqa: E402

from safeobs import data
from safeobs import onnx as so  # noqa: E402
from safeobs.data import models
from safeobs.kernels import realkernel  # noqa: E402
from safeobs.kernels.realkernel import host_isa  # noqa: E402
from safeobs.onnx import ortkernel
from safeobs.onnx.audit import audit_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def sqnr(ref, x) -> float:
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    err = np.sum((ref - x) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref**2) / err))


def session(path, exact=False, threads=1):
    opt = ort.SessionOptions()
    opt.intra_op_num_threads = threads
    opt.log_severity_level = 3
    if exact:
        opt.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])


class Reader(CalibrationDataReader):
    def __init__(self, feeds):
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


# -- models --------------------------------------------------------------------------------------


def export_minilm(path):
    model = models.minilm().eval()
    tok = models.tokenizer()
    b = tok(["a short sentence", "another one"])
    torch.onnx.export(
        model,
        (b["input_ids"], b["attention_mask"]),
        str(path),
        dynamo=False,
        input_names=["input_ids", "attention_mask"],
        output_names=["hidden"],
        dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"}, "hidden": {0: "b", 1: "l"}},
        opset_version=17,
    )
    return tok


def minilm_feeds(tok, sentences):
    b = tok(list(sentences))
    return {
        "input_ids": b["input_ids"].numpy().astype(np.int64),
        "attention_mask": b["attention_mask"].numpy().astype(np.int64),
    }


def pooled(hidden, mask):
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def export_mobilenet(path):
    model = models.mobilenet_v2().eval()
    torch.onnx.export(
        model,
        (torch.rand(1, 3, 224, 224),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
        opset_version=17,
    )


# -- measurement ---------------------------------------------------------------------------------


def interleaved_times(rows, feeds, reps):
    """Median run time of every row's session, timed round-robin (rep by rep) so that load on a
    shared host hits every configuration alike."""
    for r in rows:
        r["_sess"].run(None, feeds)
    t = {id(r): [] for r in rows}
    for _ in range(reps):
        for r in rows:
            t0 = time.perf_counter()
            r["_sess"].run(None, feeds)
            t[id(r)].append(time.perf_counter() - t0)
    for r in rows:
        r["time"] = float(np.median(t[id(r)]))
        del r["_sess"]


def kernels_ran(path) -> str:
    """Integer ops in ORT's optimized graph (what the CPU EP actually runs)."""
    opt = ort.SessionOptions()
    opt.log_severity_level = 3
    opt.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "opt.onnx")
        opt.optimized_model_filepath = out
        ort.InferenceSession(str(path), opt, providers=["CPUExecutionProvider"])
        import onnx

        m = onnx.load(out)
    ops = {}
    for n in m.graph.node:
        if n.op_type in (
            "MatMulInteger",
            "MatMulIntegerToFloat",
            "DynamicQuantizeMatMul",
            "QLinearMatMul",
            "QLinearConv",
            "ConvInteger",
            "MatMul",
            "Conv",
            "Gemm",
            "FusedMatMul",
            "FusedConv",
            "QGemm",
            "QAttention",
        ):
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))


def evaluate(name, path, feeds, ref_fn, out_fn, reps, base_time=None, emu_inputs=None):
    s = session(path)
    y = out_fn(s.run(None, feeds))
    ye = out_fn(session(path, exact=True).run(None, feeds))
    row = {
        "config": name,
        "sqnr": sqnr(ref_fn, y),
        "sqnr_exact": sqnr(ref_fn, ye),
        "avx2_vs_exact": sqnr(ye, y),
        "_sess": s,
        "kernels": kernels_ran(path),
    }
    if emu_inputs is not None:
        import onnx

        res = audit_model(onnx.load(str(path)), emu_inputs)
        row["sat_lanes"] = sum(n["cells"]["avx2"].get("saturated_lanes", 0) for n in res["nodes"])
        row["unsafe_nodes"] = len(res["unsafe"])
    return row


class _Block(torch.nn.Module):
    """A pre-norm transformer block in plain torch.nn (nn.MultiheadAttention does not export with the
    TorchScript exporter in torch 2.13)."""

    def __init__(self, d, heads):
        super().__init__()
        self.h = heads
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.ff = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.h) ** 0.5, -1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.n2(x))


def unseen_models(tmp, reps):
    """A transformer encoder layer and a small residual CNN (torch.nn, seeded random init)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    enc = _Block(256, 4).eval()
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 2, 1),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, 1, 1, groups=32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, 2, 1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 10),
    ).eval()
    with torch.no_grad():
        for mod in cnn.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 2)
    out = []
    for name, model, x in (
        ("transformer block (d 256, 4 heads)", enc, rng.standard_normal((4, 32, 256)).astype(np.float32)),
        ("residual-free CNN (dw + pw)", cnn, rng.random((8, 3, 64, 64)).astype(np.float32)),
    ):
        fp = tmp / f"unseen_{len(out)}.onnx"
        torch.onnx.export(
            model,
            (torch.from_numpy(x[:1]),),
            str(fp),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "b"}},
            opset_version=17,
        )
        feeds = {"x": x}
        ref = session(fp).run(None, feeds)[0]
        rows = []
        cal = [{"x": x[i : i + 1]} for i in range(len(x))]
        cfgs = (
            [
                ("ORT quantize_dynamic(per_channel=True)", quantize_dynamic, {}),
                ("safeobs quantize_dynamic(per_channel=True)", so.quantize_dynamic, {}),
            ]
            if "transformer" in name
            else [
                ("ORT quantize_static QDQ U8S8", quantize_static, {}),
                ("safeobs quantize_static QDQ U8S8", so.quantize_static, {}),
            ]
        )
        for i, (cname, fn, _) in enumerate(cfgs):
            q = tmp / f"unseen_{len(out)}_{i}.onnx"
            if fn in (quantize_static, so.quantize_static):
                fn(
                    str(fp),
                    str(q),
                    Reader(cal),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8,
                    per_channel=True,
                )
            else:
                fn(str(fp), str(q), per_channel=True)
            rows.append((cname, evaluate(cname, q, feeds, ref, lambda o: o[0], reps, emu_inputs=feeds)))
        interleaved_times([r for _, r in rows], feeds, reps)
        out.append((name, rows))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--qemu-sentences", type=int, default=4, help="0: skip the qemu Haswell check")
    ap.add_argument("--photos", type=int, default=0, help="held-out photos (0: all)")
    args = ap.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    t_start = time.time()
    lines = []

    # ---- MiniLM
    fp = tmp / "minilm.onnx"
    tok = export_minilm(fp)
    calib, held = data.sentences("calib"), data.sentences("heldout")
    feeds = minilm_feeds(tok, held)
    mask = feeds["attention_mask"]
    out_fn = lambda o: pooled(o[0], mask)  # noqa: E731
    ref = out_fn(session(fp).run(None, feeds))
    cal_feeds = [minilm_feeds(tok, calib[i : i + 8]) for i in range(0, len(calib), 8)]
    cfgs = [
        ("ORT quantize_dynamic (per-tensor)", quantize_dynamic, dict(per_channel=False)),
        ("safeobs quantize_dynamic (per-tensor)", so.quantize_dynamic, dict(per_channel=False)),
        ("ORT quantize_dynamic(per_channel=True)", quantize_dynamic, dict(per_channel=True)),
        ("ORT per_channel=True, reduce_range=True", quantize_dynamic, dict(per_channel=True, reduce_range=True)),
        ("ORT weight_type=QUInt8 (U8U8)", quantize_dynamic, dict(per_channel=True, weight_type=QuantType.QUInt8)),
        ("safeobs quantize_dynamic(per_channel=True)", so.quantize_dynamic, dict(per_channel=True)),
        (
            "ORT quantize_static QDQ U8S8",
            quantize_static,
            dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8),
        ),
        (
            "safeobs quantize_static QDQ U8S8",
            so.quantize_static,
            dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8),
        ),
    ]
    mini = []
    for i, (name, fn, kw) in enumerate(cfgs):
        out = tmp / f"minilm_{i}.onnx"
        if fn in (quantize_static, so.quantize_static):
            fn(str(fp), str(out), Reader(cal_feeds), **kw)
        else:
            fn(str(fp), str(out), **kw)
        mini.append((name, out, evaluate(name, out, feeds, ref, out_fn, args.reps, emu_inputs=feeds)))
        print(f"[{time.time() - t_start:5.0f}s] {name}: {mini[-1][2]['sqnr']:.2f} dB", file=sys.stderr)
    interleaved_times([r for _, _, r in mini], feeds, args.reps)
    base = mini[2][2]["time"]  # ORT's U8S8 default (per-channel dynamic)

    # qemu Haswell check: the same models as an AVX2-only CPU sees them
    qemu = {}
    if args.qemu_sentences and ortkernel.available("haswell"):
        qf = minilm_feeds(tok, held[: args.qemu_sentences])
        picks = [2, 5]
        runs = [{"model": Path(mini[j][1]).read_bytes(), "feeds": qf} for j in picks]
        t0 = time.time()
        real = ortkernel.run(runs, mode="haswell", timeout=1800)
        for j, r in zip(picks, real):
            nat = session(mini[j][1]).run(None, qf)[0]
            qemu[mini[j][0]] = (bool(np.array_equal(nat, r[0])), sqnr(nat, r[0]))
        qemu_time = time.time() - t0
    # ---- MobileNetV2
    fpm = tmp / "mobilenet.onnx"
    export_mobilenet(fpm)
    cal = data.photos("calib").numpy().astype(np.float32)
    ev = data.photos("heldout").numpy().astype(np.float32)
    if args.photos:
        ev = ev[: args.photos]
    mfeeds = {"x": ev}
    mref = session(fpm).run(None, mfeeds)[0]
    mcal = [{"x": cal[i : i + 1]} for i in range(len(cal))]
    mcfgs = [
        ("ORT quantize_static QDQ U8S8 (per-channel)", quantize_static, dict(activation_type=QuantType.QUInt8)),
        ("safeobs quantize_static QDQ U8S8 (per-channel)", so.quantize_static, dict(activation_type=QuantType.QUInt8)),
        (
            "ORT quantize_static QDQ U8S8 reduce_range",
            quantize_static,
            dict(activation_type=QuantType.QUInt8, reduce_range=True),
        ),
        (
            "ORT quantize_static QDQ U8U8",
            quantize_static,
            dict(activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8),
        ),
        ("ORT quantize_static QDQ S8S8 (default types)", quantize_static, dict()),
        ("safeobs quantize_static QDQ S8S8", so.quantize_static, dict()),
    ]
    mob = []
    for i, (name, fn, kw) in enumerate(mcfgs):
        out = tmp / f"mobilenet_{i}.onnx"
        fn(str(fpm), str(out), Reader(mcal), quant_format=QuantFormat.QDQ, per_channel=True, **kw)
        row = evaluate(name, out, mfeeds, mref, lambda o: o[0], max(3, args.reps // 2), emu_inputs={"x": ev[:2]})
        y = session(out).run(None, mfeeds)[0]
        row["top1"] = float(np.mean(y.argmax(1) == mref.argmax(1)))
        mob.append((name, out, row))
        print(f"[{time.time() - t_start:5.0f}s] {name}: {row['sqnr']:.2f} dB", file=sys.stderr)
    interleaved_times([r for _, _, r in mob], {"x": ev[:8]}, args.reps)
    mbase = mob[0][2]["time"]

    # ---- models we do not ship: random-init torch.nn models, the same checks
    unseen = unseen_models(tmp, args.reps)

    # ---- report
    isa = host_isa()
    L = lines.append
    L("# ONNX Runtime: ORT's quantizer vs safeobs.onnx (`benchmarks/bench_onnx.py`)")
    L("")
    L(
        f"Host: {realkernel.cpu_name()}, ISA seen by MLAS: **{isa}** ({'AVX2-only: native runs are the real saturating U8S8 kernels' if isa == 'avx2' else 'has ' + isa})."
        f" onnxruntime {ort.__version__}, 1 thread, torch.onnx.export (TorchScript exporter), opset 17."
    )
    L("")
    L(
        "Columns: **SQNR** vs the FP32 ONNX model on this host; **exact** = the same model with "
        "`session.x64quantprecision=1` (ORT's exact U8U8 path: the integer results of a VNNI CPU, "
        "float ops of this host); **AVX2 vs exact** = SQNR between the two outputs (what saturation "
        "changes; inf = bit-identical); **sat lanes** = int16 lanes that saturate on AVX2, counted by "
        "`safeobs.emulator_ort` on the node inputs ORT computes; **speed** = median run time / ORT's "
        "U8S8 default (per-channel dynamic for MiniLM, QDQ U8S8 for MobileNetV2), same run."
    )
    L("")
    L(f"## MiniLM (all-MiniLM-L6-v2), {len(held)} held-out sentences, mean-pooled embedding")
    L("")
    L(
        "| config | SQNR (host = AVX2) | exact (VNNI-equivalent) | AVX2 vs exact | sat lanes | speed | integer ops ORT runs |"
    )
    L("|---|---|---|---|---|---|---|")
    for name, _, r in mini:
        L(
            f"| {name} | {r['sqnr']:.2f} dB | {r['sqnr_exact']:.2f} dB | {r['avx2_vs_exact']:.1f} dB | "
            f"{r.get('sat_lanes', 0):,} | {r['time'] / base:.2f}x | {r['kernels']} |"
        )
    L("")
    if qemu:
        L(
            f"qemu Haswell check ({args.qemu_sentences} sentences, {qemu_time:.0f} s): "
            + "; ".join(
                f"{k}: {'bit-identical to native' if v[0] else f'{v[1]:.1f} dB vs native'}" for k, v in qemu.items()
            )
        )
        L("")
    L(f"## MobileNetV2, {len(ev)} held-out photos, logits")
    L("")
    L(
        "| config | SQNR (host = AVX2) | exact (VNNI-equivalent) | AVX2 vs exact | top-1 agree | sat lanes (2 photos) | speed | integer ops ORT runs |"
    )
    L("|---|---|---|---|---|---|---|---|")
    for name, _, r in mob:
        L(
            f"| {name} | {r['sqnr']:.2f} dB | {r['sqnr_exact']:.2f} dB | {r['avx2_vs_exact']:.1f} dB | {r['top1']:.0%} | "
            f"{r.get('sat_lanes', 0):,} | {r['time'] / mbase:.2f}x | {r['kernels']} |"
        )
    L("")
    L("## Models we do not ship (random-init torch.nn, exported the same way)")
    L("")
    L("| model | config | SQNR (host) | AVX2 vs exact | sat lanes | speed |")
    L("|---|---|---|---|---|---|")
    for model_name, rows in unseen:
        for name, r in rows:
            L(
                f"| {model_name} | {name} | {r['sqnr']:.2f} dB | {r['avx2_vs_exact']:.1f} dB | {r.get('sat_lanes', 0):,} | "
                f"{r['time'] / rows[0][1]['time']:.2f}x |"
            )
    L("")
    L(f"Total time {time.time() - t_start:.0f} s.")
    text = "\n".join(lines) + "\n"
    (RESULTS / "onnx.md").write_text(text)
    print(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
        for ax, rows, title in ((axes[0], mini, "MiniLM"), (axes[1], mob, "MobileNetV2")):
            names = [n for n, _, _ in rows]
            y = np.arange(len(rows))
            ax.barh(y - 0.2, [r["sqnr"] for _, _, r in rows], 0.4, label=f"host ({isa})")
            ax.barh(y + 0.2, [r["sqnr_exact"] for _, _, r in rows], 0.4, label="exact (VNNI-equivalent)")
            ax.set_yticks(y, names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("SQNR vs FP32 ONNX (dB)")
            ax.set_title(title)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "onnx.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
