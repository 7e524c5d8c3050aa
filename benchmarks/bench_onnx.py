"""ONNX Runtime: ORT's quantizer (default, reduce_range, U8U8, x64quantprecision) vs safeobs.onnx, RTN and data-aware.

MiniLM (all-MiniLM-L6-v2: dynamic per-tensor / per-channel, static QDQ U8S8) and MobileNetV2 (static QDQ
U8S8 and S8S8), exported with torch.onnx.export, real sentences and photos from safeobs.data (calibration
split for calibration, held-out split for evaluation).

* fidelity: SQNR of the output (MiniLM: mean-pooled embedding; MobileNetV2: logits) against the FP32 ONNX
  model, three ways: **AVX2** = :mod:`safeobs.onnx.modelemu` (ORT's optimized graph, its int8-weight GEMM /
  conv nodes run by the bit-exact MLAS U8S8 emulator, saturation included) on every held-out input, on any
  host; **exact** = ``session.x64quantprecision=1`` (ORT's exact U8U8 path = what a VNNI CPU computes);
  **native** = the plain session on this host (saturating on AVX2-only / AVX-512-without-VNNI hosts, exact
  on VNNI hosts);
* qemu Haswell: the real AVX2 kernels on a few sentences / photos, checked bit for bit against the AVX2 column;
* calibration draws: draw d = a random 2/3 of the calibration split (seed d); the configurations that
  depend on calibration data and matter for issue 19's targets run on every draw (mean ± std);
* time: each ``quantize_*`` call (ORT's calibration included), safeobs as a ratio to ORT's call with the
  same arguments in the same draw; inference speed as a ratio to ORT's U8S8 default, interleaved.

Writes benchmarks/results/onnx.md, onnx.json and onnx.png.  ``--part minilm`` / ``--part mobilenet`` run one
model (two processes may run side by side); the report is rendered once both parts are saved.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
import warnings
from pathlib import Path

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy: 1 thread everywhere
    os.environ.setdefault(_v, "1")

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore")

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static  # noqa: E402

from safeobs import data
from safeobs import onnx as so  # noqa: E402
from safeobs.data import models
from safeobs.kernels import realkernel  # noqa: E402
from safeobs.kernels.realkernel import host_isa  # noqa: E402
from safeobs.onnx import modelemu, ortkernel

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


NATIVE_SATURATES = host_isa() != "vnni"  # MLAS U8S8 runs vpmaddubsw on AVX2 and AVX-512 without VNNI


def native_label() -> str:
    isa = host_isa()
    return f"native {isa} ({'saturating MLAS U8S8' if NATIVE_SATURATES else 'exact VNNI kernels'})"


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def draw_subset(n: int, d: int) -> np.ndarray:
    """Calibration draw ``d``: a random 2/3 of the calibration split (seed d), as in fidelity_draws.py."""
    return np.sort(np.random.default_rng(d).choice(n, int(round(n * 2 / 3)), replace=False))


def _concat(outs):
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def evaluate(name, path, feeds, ref, out_fn, *, emulate=True, chunk=None, safe_report=None):
    """SQNR of a quantized model vs ``ref``: natively, on ORT's exact path and on AVX2.

    AVX2 = :mod:`safeobs.onnx.modelemu` (the model with its integer nodes run by the bit-exact MLAS U8S8
    emulator) on every feed when ``emulate``; otherwise, for a model whose weights :func:`safeobs.onnx.verify`
    proves safe (``safe_report.ok``: no kernel pair can saturate for any u8 input), AVX2 == exact."""
    s = session(path)
    y = out_fn(s.run(None, feeds))
    ye = out_fn(session(path, exact=True).run(None, feeds))
    row = {
        "config": name,
        "sqnr": sqnr(ref, y),
        "sqnr_exact": sqnr(ref, ye),
        "native_vs_exact": sqnr(ye, y),
        "_sess": s,
        "_y": y,
        "kernels": kernels_ran(path),
    }
    if emulate:
        plan = modelemu.build_plan(path)
        batches = chunk(feeds) if chunk else [feeds]
        outs, nsat = modelemu.run(plan, batches, "avx2")
        ya = out_fn(_concat(outs))
        row.update(
            sqnr_avx2=sqnr(ref, ya),
            avx2_vs_exact=sqnr(ye, ya),
            sat_lanes=int(nsat),
            avx2_from="emulated",
            emulated_nodes=len(plan["emulated"]),
            not_emulated=plan["not_emulated"],
        )
    elif safe_report is not None and safe_report.ok:
        row.update(sqnr_avx2=row["sqnr_exact"], avx2_vs_exact=float("inf"), sat_lanes=0, avx2_from="verify")
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
            rows.append((cname, evaluate(cname, q, feeds, ref, lambda o: o[0])))
        interleaved_times([r for _, r in rows], feeds, reps)
        out.append((name, rows))
    return out


def _cfg_rows(results, key):
    """All draws' rows of one configuration."""
    return [r for r in results if r["key"] == key]


def _stat(rows, field):
    v = np.array([r[field] for r in rows if field in r], np.float64)
    if v.size == 0:
        return None
    return float(v.mean()), float(v.std()), int(v.size)


def _fmt(st, unit=" dB", digits=2):
    if st is None:
        return ""
    m, sd, n = st
    if np.isinf(m):
        return "inf"
    return f"{m:.{digits}f}{unit}" if n == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}{unit}"


def run_configs(
    model_name,
    cfgs,
    draws,
    make_cal,
    fp,
    feeds,
    ref,
    out_fn,
    tmp,
    t_start,
    chunk=None,
    top1=False,
    emulate_draws=(),
    time_feeds=None,
    reps=7,
    checkpoint=None,
):
    """Quantize and evaluate every configuration; draw-dependent ones on every draw (others on draw 0).

    ``cfgs``: ``(key, label, fn, kwargs, per_draw, kind)`` with kind "ort" (ORT's call), "rtn" / "da"
    (safeobs without / with calibration data).  Each quantize call is timed; within a draw a safeobs
    call's time is divided by ORT's call with the same arguments (``ref_key``) in the same draw."""
    results = []
    for d in range(draws):
        cal = make_cal(d)
        times = {}
        for key, label, fn, kw, per_draw, kind, _ in cfgs:
            if d > 0 and not per_draw:
                continue
            out = tmp / f"{model_name}_{key}_{d}.onnx"
            kw = dict(kw)
            static = fn in (quantize_static, so.quantize_static)
            if static:
                if kind == "rtn":
                    kw["data_aware"] = False
                rep, t = timed(fn, str(fp), str(out), Reader(cal), **kw)
            elif kind == "da":
                rep, t = timed(fn, str(fp), str(out), calibration_data_reader=Reader(cal), **kw)
            else:
                rep, t = timed(fn, str(fp), str(out), **kw)
            times[key] = t
            if d > 0 and fn is quantize_dynamic:
                continue  # no calibration data: the same model on every draw, timed for the ratios only
            safe = rep if kind in ("rtn", "da") else None
            # full AVX2 emulation on draw 0, and on every draw for ORT's (saturating) weights
            row = evaluate(
                label, out, feeds, ref, out_fn, emulate=(d == 0 or key in emulate_draws), chunk=chunk, safe_report=safe
            )
            row.update(key=key, draw=d, kind=kind, quant_time=t, path=str(out))
            if safe is not None:
                row["verify_ok"] = bool(safe.ok)
                if kind == "da":
                    obj = np.concatenate([np.atleast_1d(e) for e, _ in safe.rounded.values()]) if safe.rounded else []
                    rtn = np.concatenate([np.atleast_1d(r) for _, r in safe.rounded.values()]) if safe.rounded else []
                    row["rounded_weights"] = len(safe.rounded)
                    row["objective_ratio"] = float(np.sum(obj) / max(np.sum(rtn), 1e-30)) if len(obj) else None
                    row["fallbacks"] = [f"{f.weight}: {f.reason}" for f in getattr(safe, "fallbacks", [])]
            if top1:
                row["top1"] = float(np.mean(row["_y"].argmax(1) == ref.argmax(1)))
            results.append(row)
            print(
                f"[{time.time() - t_start:5.0f}s] {model_name} draw {d} {label}: AVX2 {row.get('sqnr_avx2', float('nan')):.2f} dB,"
                f" exact {row['sqnr_exact']:.2f} dB, native {row['sqnr']:.2f} dB, quantize {t:.1f} s",
                file=sys.stderr,
            )
        for row in results:
            if row["draw"] == d:
                rk = next((c[6] for c in cfgs if c[0] == row["key"] and len(c) > 6), None)
                if rk in times:
                    row["time_ratio"] = row["quant_time"] / times[rk]
        if d == 0:  # inference speed of draw 0's models, interleaved
            interleaved_times([r for r in results if r["draw"] == 0], time_feeds or feeds, reps)
        for r in results:
            r.pop("_y", None)
        if checkpoint is not None:
            checkpoint(results)
    return results


def table(results, cfgs, base_key, top1=False):
    lines = []
    head = (
        "| config | draws | **AVX2** (emulated MLAS U8S8) | exact (`x64quantprecision=1` = VNNI) | "
        + native_label()
        + " | AVX2 vs exact | sat lanes (AVX2) |"
    )
    head += " top-1 agree |" if top1 else ""
    head += " run time | quantize call (vs ORT's) | integer ops ORT runs |"
    lines.append(head)
    lines.append("|" + "---|" * (head.count("|") - 1))
    base = next(r for r in results if r["key"] == base_key and r["draw"] == 0)["time"]
    for key, label, *_ in cfgs:
        rows = _cfg_rows(results, key)
        r0 = rows[0]
        sat = _stat(rows, "sat_lanes")
        avx2 = _fmt(_stat(rows, "sqnr_avx2"))
        if any(r.get("avx2_from") == "verify" for r in rows):
            avx2 += " †"
        elif sum("sqnr_avx2" in r for r in rows) < len(rows):
            avx2 += " ‡"
        cells = [
            label,
            str(len(rows)),
            f"**{avx2}**" if r0["kind"] != "ort" else avx2,
            _fmt(_stat(rows, "sqnr_exact")),
            _fmt(_stat(rows, "sqnr")),
            _fmt(_stat(rows, "avx2_vs_exact"), digits=1),
            "" if sat is None else f"{sat[0]:,.0f}",
        ]
        if top1:
            cells.append(_fmt(_stat(rows, "top1"), unit="", digits=2))
        tr = _stat(rows, "time_ratio")
        qt = _stat(rows, "quant_time")
        cells += [
            f"{r0['time'] / base:.2f}x",
            f"{qt[0]:.1f} s" + (f" ({tr[0]:.2f}x)" if tr else ""),
            r0.get("kernels") or (kernels_ran(r0["path"]) if Path(r0.get("path", "")).exists() else ""),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def minilm_configs():
    qdq_u8 = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8)
    # key, label, function, kwargs, per draw, kind, ORT reference call for the time ratio
    return qdq_u8, [
        ("ort_pt", "ORT quantize_dynamic (per-tensor)", quantize_dynamic, dict(per_channel=False), False, "ort", None),
        (
            "rtn_pt",
            "safeobs quantize_dynamic (per-tensor), RTN",
            so.quantize_dynamic,
            dict(per_channel=False),
            False,
            "rtn",
            "ort_pt",
        ),
        (
            "da_pt",
            "**safeobs quantize_dynamic (per-tensor), data-aware**",
            so.quantize_dynamic,
            dict(per_channel=False),
            False,
            "da",
            "ort_pt",
        ),
        (
            "ort_pc",
            "ORT quantize_dynamic(per_channel=True)",
            quantize_dynamic,
            dict(per_channel=True),
            True,
            "ort",
            None,
        ),
        (
            "ort_rr",
            "ORT per_channel=True, reduce_range=True",
            quantize_dynamic,
            dict(per_channel=True, reduce_range=True),
            False,
            "ort",
            None,
        ),
        (
            "ort_u8u8",
            "ORT weight_type=QUInt8 (U8U8)",
            quantize_dynamic,
            dict(per_channel=True, weight_type=QuantType.QUInt8),
            False,
            "ort",
            None,
        ),
        (
            "rtn_pc",
            "safeobs quantize_dynamic(per_channel=True), RTN",
            so.quantize_dynamic,
            dict(per_channel=True),
            False,
            "rtn",
            "ort_pc",
        ),
        (
            "da_pc",
            "**safeobs quantize_dynamic(per_channel=True), data-aware**",
            so.quantize_dynamic,
            dict(per_channel=True),
            True,
            "da",
            "ort_pc",
        ),
        (
            "da_pc_nobc",
            "safeobs per_channel=True, data-aware, bias_correction=False (ablation)",
            so.quantize_dynamic,
            dict(per_channel=True, bias_correction=False),
            True,
            "da",
            "ort_pc",
        ),
        ("ort_st", "ORT quantize_static QDQ U8S8", quantize_static, qdq_u8, False, "ort", None),
        (
            "rtn_st",
            "safeobs quantize_static QDQ U8S8, data_aware=False",
            so.quantize_static,
            qdq_u8,
            False,
            "rtn",
            "ort_st",
        ),
        (
            "da_st",
            "**safeobs quantize_static QDQ U8S8, data-aware**",
            so.quantize_static,
            qdq_u8,
            False,
            "da",
            "ort_st",
        ),
    ]


def mobilenet_configs():
    pc = dict(quant_format=QuantFormat.QDQ, per_channel=True)
    return [
        (
            "ort_u8s8",
            "ORT quantize_static QDQ U8S8 (per-channel)",
            quantize_static,
            dict(pc, activation_type=QuantType.QUInt8),
            True,
            "ort",
            None,
        ),
        (
            "rtn_u8s8",
            "safeobs quantize_static QDQ U8S8, data_aware=False",
            so.quantize_static,
            dict(pc, activation_type=QuantType.QUInt8),
            True,
            "rtn",
            "ort_u8s8",
        ),
        (
            "da_u8s8",
            "**safeobs quantize_static QDQ U8S8, data-aware**",
            so.quantize_static,
            dict(pc, activation_type=QuantType.QUInt8),
            True,
            "da",
            "ort_u8s8",
        ),
        (
            "ort_rr",
            "ORT quantize_static QDQ U8S8 reduce_range",
            quantize_static,
            dict(pc, activation_type=QuantType.QUInt8, reduce_range=True),
            False,
            "ort",
            None,
        ),
        (
            "ort_u8u8",
            "ORT quantize_static QDQ U8U8",
            quantize_static,
            dict(pc, activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8),
            False,
            "ort",
            None,
        ),
        ("ort_s8s8", "ORT quantize_static QDQ S8S8 (default types)", quantize_static, pc, False, "ort", None),
        ("da_s8s8", "safeobs quantize_static QDQ S8S8, data-aware", so.quantize_static, pc, False, "da", "ort_s8s8"),
    ]


def part_minilm(args, tmp, t_start):
    fp = tmp / "minilm.onnx"
    tok = export_minilm(fp)
    calib, held = data.sentences("calib"), data.sentences("heldout")
    if args.sentences:
        held = held[: args.sentences]
    feeds = minilm_feeds(tok, held)
    mask = feeds["attention_mask"]
    out_fn = lambda o: pooled(o[0], mask)  # noqa: E731
    ref = out_fn(session(fp).run(None, feeds))

    def mini_cal(d):
        sub = [calib[i] for i in draw_subset(len(calib), d)]
        return [minilm_feeds(tok, sub[i : i + 8]) for i in range(0, len(sub), 8)]

    _, mcfgs = minilm_configs()

    def save(rows):
        _save(args, "minilm", {"mini": rows, "mcfgs": _keys(mcfgs), "n_sent": len(held)}, t_start)

    mini = run_configs(
        "minilm", mcfgs, args.draws, mini_cal, fp, feeds, ref, out_fn, tmp, t_start, reps=args.reps, checkpoint=save
    )
    d0 = [r for r in mini if r["draw"] == 0]
    checks = []
    if args.qemu_sentences:
        qf = minilm_feeds(tok, held[: args.qemu_sentences])
        checks = [(r, qf) for r in d0 if r["key"] in ("ort_pc", "da_pc")]
    qemu, qt = _guard(qemu_check, ([], 0.0), checks, "MiniLM")
    return {"mini": mini, "mcfgs": _keys(mcfgs), "qemu_mini": qemu, "qemu_time_mini": qt, "n_sent": len(held)}


def part_mobilenet(args, tmp, t_start):
    fpm = tmp / "mobilenet.onnx"
    export_mobilenet(fpm)
    cal = data.photos("calib").numpy().astype(np.float32)
    ev = data.photos("heldout").numpy().astype(np.float32)
    if args.photos:
        ev = ev[: args.photos]
    mfeeds = {"x": ev}
    mref = session(fpm).run(None, mfeeds)[0]

    def mob_cal(d):
        return [{"x": cal[i : i + 1]} for i in draw_subset(len(cal), d)]

    def chunk8(f):
        return [{"x": f["x"][i : i + 8]} for i in range(0, len(f["x"]), 8)]

    bcfgs = mobilenet_configs()
    mob = run_configs(
        "mobilenet",
        bcfgs,
        args.draws,
        mob_cal,
        fpm,
        mfeeds,
        mref,
        lambda o: o[0],
        tmp,
        t_start,
        chunk=chunk8,
        top1=True,
        time_feeds={"x": ev[:8]},
        reps=args.reps,
        checkpoint=lambda rows: _save(
            args, "mobilenet", {"mob": rows, "bcfgs": _keys(bcfgs), "n_photos": len(ev)}, t_start
        ),
    )
    checks = []
    if args.qemu_photos:
        qf = {"x": ev[: args.qemu_photos]}
        checks = [(r, qf) for r in mob if r["draw"] == 0 and r["key"] in ("ort_u8s8", "da_u8s8")]
    qemu, qt = _guard(qemu_check, ([], 0.0), checks, "MobileNetV2")
    unseen = [] if args.skip_unseen else _guard(unseen_models, [], tmp, args.reps)
    return {
        "mob": mob,
        "bcfgs": _keys(bcfgs),
        "qemu_mob": qemu,
        "qemu_time_mob": qt,
        "n_photos": len(ev),
        "unseen": unseen,
    }


def _save(args, name, res, t_start):
    """The part's results so far (a checkpoint after every draw; the report renders from them)."""
    res = dict(res, **{f"seconds_{name}": time.time() - t_start})
    with open(Path(args.state_dir) / f"{name}.pkl", "wb") as f:
        pickle.dump(_picklable(res), f)


def _guard(fn, default, *args):
    """An optional section: its error is printed, the measured results are kept."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        print(f"{fn.__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)
        return default


def qemu_check(checks, model):
    """The real MLAS AVX2 kernels under qemu Haswell on a few inputs, against the emulated AVX2 plan."""
    if not checks or not ortkernel.available("haswell"):
        return [], 0.0
    t0 = time.time()
    real = ortkernel.run(
        [{"model": Path(r["path"]).read_bytes(), "feeds": f} for r, f in checks], mode="haswell", timeout=3600
    )
    out = []
    for (r, f), y in zip(checks, real):
        plan = modelemu.build_plan(r["path"])
        emu, nsat = modelemu.run(plan, f, "avx2")
        (emu_q,), _ = modelemu.run(plan, [f], "avx2", mode="haswell")  # the same plan, float ops of Haswell
        exact = session(r["path"], exact=True).run(None, f)
        out.append(
            {
                "config": r["config"],
                "model": model,
                "inputs": len(next(iter(f.values()))),
                "emulated_equal": bool(all(np.array_equal(a, b) for a, b in zip(y, emu))),
                "plan_qemu_equal": bool(all(np.array_equal(a, b) for a, b in zip(y, emu_q))),
                "exact_equal": bool(all(np.array_equal(a, b) for a, b in zip(y, exact))),
                "real_vs_exact": sqnr(exact[0], y[0]),
                "sat_lanes": int(nsat),
            }
        )
    return out, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--draws", type=int, default=5, help="calibration draws (random 2/3 of the calibration split)")
    ap.add_argument("--qemu-sentences", type=int, default=2, help="0: skip the qemu Haswell check")
    ap.add_argument("--qemu-photos", type=int, default=1)
    ap.add_argument("--photos", type=int, default=0, help="held-out photos (0: all)")
    ap.add_argument("--sentences", type=int, default=0, help="held-out sentences (0: all)")
    ap.add_argument("--skip-unseen", action="store_true")
    ap.add_argument(
        "--part",
        choices=("all", "minilm", "mobilenet"),
        default="all",
        help="run one model only (saved to --state-dir; two parts may run side by side), then the report "
        "is rendered from whatever parts are saved",
    )
    ap.add_argument("--state-dir", default=str(Path(tempfile.gettempdir()) / "bench_onnx_state"))
    ap.add_argument("--report-only", action="store_true", help="render the report from the saved parts")
    args = ap.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
        t_start = time.time()
        for name, fn in (("minilm", part_minilm), ("mobilenet", part_mobilenet)):
            if args.part in ("all", name):
                _save(args, name, fn(args, tmp, t_start), t_start)
    parts = {}
    for name in ("minilm", "mobilenet"):
        if (state / f"{name}.pkl").exists():
            with open(state / f"{name}.pkl", "rb") as f:
                parts.update(pickle.load(f))
    if "mini" in parts and "mob" in parts:
        write_report(args, parts)


def _keys(cfgs):
    """The configurations without their functions (picklable)."""
    return [(c[0], c[1], None, c[3], c[4], c[5], c[6]) for c in cfgs]


def _picklable(x):
    if isinstance(x, list):
        return [_picklable(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_picklable(v) for v in x)
    if isinstance(x, dict):
        return {k: _picklable(v) for k, v in x.items() if not str(k).startswith("_")}
    return x


def _targets(mini, mob):
    """Issue 19's targets, from the measured rows."""

    def mean(rows, key, field):
        st = _stat(_cfg_rows(rows, key), field)
        return None if st is None else st[0]

    out = []
    a, b = mean(mini, "da_pc", "sqnr_avx2"), mean(mini, "ort_pc", "sqnr_exact")
    out.append(
        ("MiniLM quantize_dynamic(per_channel=True): safeobs data-aware on AVX2 >= ORT's exact path", a, b, a >= b)
    )
    a, b = mean(mob, "da_u8s8", "sqnr_avx2"), mean(mob, "ort_u8s8", "sqnr_exact")
    out.append(("MobileNetV2 quantize_static: safeobs data-aware on AVX2 >= ORT's exact path", a, b, a >= b))
    for name, rows, key in (
        ("MiniLM dynamic per-channel", mini, "da_pc"),
        ("MiniLM dynamic per-tensor", mini, "da_pt"),
        ("MiniLM static", mini, "da_st"),
        ("MobileNetV2 static", mob, "da_u8s8"),
    ):
        st = _stat(_cfg_rows(rows, key), "time_ratio")
        out.append((f"{name}: calibration (quantize call) time <= 5x ORT's own call", st[0], 5.0, st[0] <= 5.0))
    return out


def write_report(args, parts):
    mini, mcfgs, mob, bcfgs = parts["mini"], parts["mcfgs"], parts["mob"], parts["bcfgs"]
    qemu = parts.get("qemu_mini", []) + parts.get("qemu_mob", [])
    qemu_time = parts.get("qemu_time_mini", 0.0) + parts.get("qemu_time_mob", 0.0)
    unseen, n_sent, n_photos = parts.get("unseen", []), parts["n_sent"], parts["n_photos"]
    isa = host_isa()
    lines = []
    L = lines.append
    L("# ONNX Runtime: ORT's quantizer vs safeobs.onnx (`benchmarks/bench_onnx.py`)")
    L("")
    L(
        f"Host: {realkernel.cpu_name()}, ISA seen by MLAS: **{isa}** ("
        + (
            "AVX2 / AVX-512 without VNNI: native runs are the real saturating U8S8 kernels"
            if NATIVE_SATURATES
            else "VNNI: native runs are MLAS's exact VNNI kernels; the AVX2 column is emulated, checked against qemu Haswell"
        )
        + f"). onnxruntime {ort.__version__}, 1 thread, torch.onnx.export (TorchScript exporter), opset 17."
    )
    L("")
    L(
        "Columns: **AVX2** = SQNR vs the FP32 ONNX model of what an AVX2-only CPU computes: ORT's optimized graph "
        "with every int8-weight GEMM / conv node run by `safeobs.onnx.emulator` (bit-exact MLAS U8S8, int16 "
        "saturation included; `safeobs.onnx.modelemu`), everything else by ORT on this host, on every held-out "
        "input; **exact** = the same model with `session.x64quantprecision=1` (ORT's exact U8U8 path: the integer "
        f"results of a VNNI CPU); **{native_label()}** = the plain session on this host; **AVX2 vs exact** = SQNR "
        "between the two outputs (inf = bit-identical); **sat lanes** = int16 lanes that saturate on AVX2 (emulator "
        "count); **run time** = median inference time on this host / ORT's U8S8 default (per-channel dynamic for MiniLM, "
        "QDQ U8S8 for MobileNetV2), draw 0, interleaved; **quantize call** = seconds of the `quantize_*` call "
        "(ORT's calibration included) and, for safeobs, its ratio to ORT's call with the same arguments in the same "
        "draw. **draws**: calibration draws (draw d = a random 2/3 of the calibration split, seed d), mean ± std; "
        "configurations without calibration data (or extra rows) are measured once. "
        "† draws 1+ of safeobs models: AVX2 = exact because `safeobs.onnx.verify` proves that no kernel pair can "
        "saturate (draw 0 shows it with the full emulation: 0 lanes, AVX2 vs exact inf). ‡ AVX2 emulated on draw 0 only."
    )
    L("")
    L(f"## MiniLM (all-MiniLM-L6-v2), {n_sent} held-out sentences, mean-pooled embedding")
    L("")
    lines += table(mini, mcfgs, "ort_pc")
    L("")
    L(f"## MobileNetV2, {n_photos} held-out photos, logits")
    L("")
    lines += table(mob, bcfgs, "ort_u8s8", top1=True)
    L("")
    if qemu:
        L(f"## qemu Haswell (`qemu-x86_64 -cpu Haswell`: the real MLAS AVX2 kernels), {qemu_time:.0f} s")
        L("")
        L(
            "| model | config (draw 0) | inputs | real AVX2 == emulator plan run under qemu (bit for bit) | "
            "real AVX2 == emulated AVX2 column (this host's float ops) | real AVX2 vs exact | sat lanes (emulated) |"
        )
        L("|---|---|---|---|---|---|---|")
        for q in qemu:
            pq = q.get("plan_qemu_equal")
            L(
                f"| {q['model']} | {q['config']} | {q['inputs']} | {'not run' if pq is None else ('yes' if pq else '**no**')} | "
                f"{'yes' if q['emulated_equal'] else 'no'} | {q['real_vs_exact']:.1f} dB | {q['sat_lanes']:,} |"
            )
        L("")
        L(
            "The plan run under qemu executes the same integer nodes through the emulator and the float nodes with "
            "Haswell's kernels: bit-identical means the emulator reproduces the real AVX2 integer results. The AVX2 "
            "column runs the float nodes with this host's kernels, which may differ from Haswell's in the last bits "
            "(~145 dB); the integer nodes do not."
        )
        L("")
    L("## Issue 19 targets")
    L("")
    L("| target | measured | reference | met |")
    L("|---|---|---|---|")
    for name, a, b, ok in _targets(mini, mob):
        unit = "x" if "time" in name else " dB"
        L(f"| {name} | {a:.2f}{unit} | {b:.2f}{unit} | {'yes' if ok else '**no**'} |")
    L("")
    by_reason = {}
    for f in {f for r in mini + mob for f in r.get("fallbacks", [])}:
        w, why = f.split(": ", 1)
        by_reason.setdefault(why, set()).add(w)
    fb = [f"{why} ({len(ws)} weights)" for why, ws in sorted(by_reason.items())]
    ne = sorted({f for r in mini + mob for f in r.get("not_emulated", [])})
    L(
        f"Data-aware fallbacks to RTN codes: {'; '.join(fb) if fb else 'none'}. Nodes left to ORT by the emulation: {'; '.join(ne) if ne else 'none'}."
    )
    L("")
    if unseen:
        L("## Models we do not ship (random-init torch.nn, exported the same way, draw 0 only)")
        L("")
        L("| model | config | AVX2 (emulated) | exact | AVX2 vs exact | sat lanes | run time |")
        L("|---|---|---|---|---|---|---|")
        for model_name, rows in unseen:
            for name, r in rows:
                L(
                    f"| {model_name} | {name} | {r['sqnr_avx2']:.2f} dB | {r['sqnr_exact']:.2f} dB | {r['avx2_vs_exact']:.1f} dB | "
                    f"{r.get('sat_lanes', 0):,} | {r['time'] / rows[0][1]['time']:.2f}x |"
                )
        L("")
    L(
        f"Wall time: MiniLM part {parts['seconds_minilm']:.0f} s, MobileNetV2 part {parts['seconds_mobilenet']:.0f} s"
        " (the two parts may run side by side, `--part`; the host was shared with other jobs)."
    )
    text = "\n".join(lines) + "\n"
    (RESULTS / "onnx.md").write_text(text)
    print(text)

    def clean(rows):
        return [{k: v for k, v in r.items() if not k.startswith("_") and k != "path"} for r in rows]

    js = {
        "host": {"cpu": realkernel.cpu_name(), "isa": isa, "native": native_label(), "onnxruntime": ort.__version__},
        "draws": 1 + max(r["draw"] for r in mini + mob),
        "minilm": clean(mini),
        "mobilenet": clean(mob),
        "qemu": qemu,
        "targets": [dict(target=n, measured=a, reference=b, met=bool(ok)) for n, a, b, ok in _targets(mini, mob)],
    }
    (RESULTS / "onnx.json").write_text(json.dumps(js, indent=1, default=float) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(14, 5))
        for ax, rows, cfgs, title in ((axes[0], mini, mcfgs, "MiniLM"), (axes[1], mob, bcfgs, "MobileNetV2")):
            names = [c[1].replace("**", "") for c in cfgs]
            y = np.arange(len(cfgs))
            for off, field, lab in (
                (-0.2, "sqnr_avx2", "AVX2 (emulated MLAS U8S8)"),
                (0.2, "sqnr_exact", "exact (= VNNI)"),
            ):
                st = [_stat(_cfg_rows(rows, c[0]), field) or (np.nan, 0, 0) for c in cfgs]
                ax.barh(y + off, [s[0] for s in st], 0.4, xerr=[s[1] for s in st], label=lab)
            ax.set_yticks(y, names, fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel("SQNR vs FP32 ONNX (dB), mean ± std over calibration draws")
            ax.set_title(f"{title} ({realkernel.cpu_name()}, {isa})")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS / "onnx.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
