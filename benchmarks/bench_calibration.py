"""Issue 19: calibration time of every data-aware safeobs flow as a ratio to the stock flow's, measured side by side.

Re-measured after issue 20's blocked rounding (``safeobs.core.rounding``).  Each flow runs in its own worker process
(``--worker FLOW``) that builds the models and calibration data once (untimed), runs one untimed warm-up call of the
stock and of the safeobs flow (lazy imports, first-call kernel/JIT set-up: excluded for both), then ``--rounds``
interleaved rounds ``stock, safeobs`` (the order alternates every round).  Per round: ratio = safeobs s / stock s;
reported: median and min-max of the per-round ratios, median absolute seconds.  The stock flows are the
definitions of the flow benchmarks, with their calibration data:

* **pt2e** (``bench_pt2e.py``): stock = ``prepare_pt2e`` (torchao's ``X86InductorQuantizer`` +
  ``get_default_x86_inductor_quantization_config()``) + the calibration forward passes + ``convert_pt2e``;
  safeobs = ``safeobs.quantize_pt2e(exported, example, calibration)``.  Both start from a copy (untimed) of the
  same ``torch.export``-ed graph (exported once with dynamic shapes: export excluded for both).  32 calibration
  inputs (MiniLM: the 30 calibration sentences) in batches of 8 (draw 0).
* **torchao** (``bench_torchao.py``, MiniLM's 36 Linears): stock = torchao
  ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` + one float forward pass over the calibration data
  (torchao's dynamic config needs no calibration at all: the forward pass is what a calibrating flow pays at
  least); safeobs = ``safeobs.torchao.quantize_(model, calibration=...)``.  Draw 0: a seeded 2/3 of the
  calibration sentences, one per batch.  The ratio to ``quantize_`` alone is reported too.
* **onnx** (``bench_onnx.py``, each call on the exported FP32 ONNX file, ORT's calibration included): MiniLM
  ORT ``quantize_dynamic(per_channel=True)`` vs ``safeobs.onnx.quantize_dynamic(per_channel=True,
  calibration_data_reader=...)``, and ORT ``quantize_static`` QDQ U8S8 vs ``safeobs.onnx.quantize_static`` (same
  arguments); MobileNetV2 ``quantize_static`` QDQ U8S8 per-channel vs safeobs's.  Draw 0: a seeded 2/3 of the
  calibration split (MiniLM in batches of 8 sentences, photos one per batch).
* **openvino** (``bench_openvino.py``): stock = ``nncf.quantize(ov_model, dataset, subset_size=all)``; safeobs =
  ``safeobs.openvino.quantize`` with the same arguments (data-aware by default).  All calibration inputs, one per
  item.

Writes benchmarks/results/calibration.{md,json,png} (``--out``).  ``--smoke``: tiny models, 2 rounds, no files
unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
FLOWS = ("pt2e", "torchao", "onnx", "openvino")
TARGET = 5.0

warnings.filterwarnings("ignore")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- timing -----------------------------------------------------------------------------------------


def interleaved(stock, safe, rounds: int, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Time ``stock()`` and ``safe()`` interleaved: ``warmup`` untimed calls of each, then ``rounds`` rounds of one
    call each, the order alternating (round 0: stock first).  A call that returns a float reports its own seconds
    (to keep an untimed model copy out); otherwise the call is timed.  Returns the per-round seconds and ratios."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        stock()
        safe()
    ts, tf = [], []
    for r in range(rounds):
        order = ((stock, ts), (safe, tf)) if r % 2 == 0 else ((safe, tf), (stock, ts))
        for fn, acc in order:
            t = clock()
            v = fn()
            acc.append(v if isinstance(v, float) else clock() - t)
    return {"stock_s": ts, "safeobs_s": tf, "ratios": [b / a for a, b in zip(ts, tf)]}


def summary(rec: dict) -> dict:
    """Median seconds, median ratio and its min-max over the rounds, and whether the <= 5x target is met."""
    import numpy as np

    r = np.asarray(rec["ratios"], float)
    med = float(np.median(r))
    return {
        "stock": float(np.median(rec["stock_s"])),
        "safeobs": float(np.median(rec["safeobs_s"])),
        "ratio": med,
        "ratio_min": float(r.min()),
        "ratio_max": float(r.max()),
        "met": bool(med <= TARGET),
    }


# -- host --------------------------------------------------------------------------------------------


def host_info() -> dict:
    cpu, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512vbmi", "avx_vnni", "amx_int8") if f in flags]
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "python": platform.python_version()}


def threads_info() -> dict:
    import torch

    out = {"torch_threads": torch.get_num_threads()}
    try:
        from threadpoolctl import threadpool_info

        out["blas"] = sorted({f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info()})
    except ImportError:  # pragma: no cover
        out["blas"] = []
    out["env"] = {
        v: os.environ[v] for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ
    }
    return out


# -- the flows (each called in its own worker process) -----------------------------------------------


def _case(flow, model, stock, safe, args, **extra) -> dict | None:
    if getattr(args, "models", None) and model not in args.models:
        return None
    log(f"{flow} {model}: warm-up {args.warmup}, {args.rounds} interleaved rounds")
    la0 = os.getloadavg()
    rec = interleaved(stock, safe, args.rounds, args.warmup)
    rec.update(flow=flow, model=model, load_start=la0, load_end=os.getloadavg(), **extra)
    s = summary(rec)
    log(f"{flow} {model}: stock {s['stock']:.2f} s, safeobs {s['safeobs']:.2f} s, ratio {s['ratio']:.2f}x")
    return rec


def flow_pt2e(args) -> list[dict]:
    import copy

    import bench_pt2e as bp
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    import safeobs

    tasks = [bp.toy_task(8, 2, 4)] if args.smoke else [bp.mobilenet_task(32, 2, 8), bp.minilm_task(32, 2, 8)]
    out = []
    for task in tasks:
        cal = task.calib_fn(0)

        def stock(task=task, cal=cal):
            g = copy.deepcopy(task.exported)
            t = time.perf_counter()
            p = prepare_pt2e(
                g, xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            )
            with torch.no_grad():
                for b in cal:
                    p(*b)
            convert_pt2e(p)
            return time.perf_counter() - t

        def safe(task=task, cal=cal):
            g = copy.deepcopy(task.exported)
            t = time.perf_counter()
            safeobs.quantize_pt2e(g, task.example, cal, progress=False)
            return time.perf_counter() - t

        out.append(_case("PT2E", task.name, stock, safe, args, n_calib=sum(len(b[0]) for b in cal)))
    return out


def flow_torchao(args) -> list[dict]:
    import copy

    import torch
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    import safeobs.torchao as sto
    from safeobs.data import models

    if args.smoke:
        g = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)).eval()
        cal = [(torch.randn(4, 64, generator=g),) for _ in range(3)]
        name = "toy MLP"
    else:
        import bench_torchao as bt

        model, tok = models.minilm().eval(), models.tokenizer()
        cal = bt.calibration_draw(tok, 0)
        name = "MiniLM"
    times_q = []

    def stock():
        m = copy.deepcopy(model)
        t = time.perf_counter()
        quantize_(m, Int8DynamicActivationInt8WeightConfig())
        tq = time.perf_counter() - t
        with torch.no_grad():
            for b in cal:
                model(*b)
        times_q.append(tq)
        return time.perf_counter() - t

    def safe():
        m = copy.deepcopy(model)
        t = time.perf_counter()
        sto.quantize_(m, calibration=cal, progress=False)
        return time.perf_counter() - t

    rec = _case("torchao", name, stock, safe, args, n_calib=len(cal))
    if rec is None:
        return []
    rec["quantize_only_s"] = times_q[args.warmup :]
    return [rec]


def flow_onnx(args) -> list[dict]:
    import bench_onnx as bo  # first: it pins OMP/BLAS threads to 1 as in the ONNX benchmark
    import numpy as np
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from safeobs import data
    from safeobs import onnx as so

    tmp = Path(tempfile.mkdtemp(prefix="bench_calib_onnx_"))
    qdq_u8 = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8)
    out = []

    def pair(stock_fn, safe_fn, fp, cal, kw, dynamic):
        def stock():
            if dynamic:
                stock_fn(str(fp), str(tmp / "s.onnx"), **kw)
            else:
                stock_fn(str(fp), str(tmp / "s.onnx"), bo.Reader(cal), **kw)

        def safe():
            if dynamic:
                safe_fn(str(fp), str(tmp / "f.onnx"), calibration_data_reader=bo.Reader(cal), **kw)
            else:
                safe_fn(str(fp), str(tmp / "f.onnx"), bo.Reader(cal), **kw)

        return stock, safe

    if not args.smoke:
        fp = tmp / "minilm.onnx"
        tok = bo.export_minilm(fp)
        calib = data.sentences("calib")
        sub = [calib[i] for i in bo.draw_subset(len(calib), 0)]
        cal = [bo.minilm_feeds(tok, sub[i : i + 8]) for i in range(0, len(sub), 8)]
        pc = dict(per_channel=True)
        out.append(
            _case(
                "ONNX Runtime",
                "MiniLM",
                *pair(quantize_dynamic, so.quantize_dynamic, fp, cal, pc, True),
                args,
                variant="quantize_dynamic(per_channel=True)",
                n_calib=len(sub),
            )
        )
        out.append(
            _case(
                "ONNX Runtime",
                "MiniLM",
                *pair(quantize_static, so.quantize_static, fp, cal, qdq_u8, False),
                args,
                variant="quantize_static QDQ U8S8",
                n_calib=len(sub),
            )
        )
    fpm = tmp / "mobilenet.onnx"
    if args.smoke:
        import torch

        m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8)).eval()
        torch.onnx.export(m, (torch.rand(1, 3, 32, 32),), str(fpm), dynamo=False, input_names=["x"], opset_version=17)
        photos = data.photos("calib", 32).numpy().astype(np.float32)[:4]
        cal, name = [{"x": photos[i : i + 1]} for i in range(len(photos))], "toy CNN"
    else:
        bo.export_mobilenet(fpm)
        photos = data.photos("calib").numpy().astype(np.float32)
        cal, name = [{"x": photos[i : i + 1]} for i in bo.draw_subset(len(photos), 0)], "MobileNetV2"
    kw = dict(qdq_u8, per_channel=True)
    out.append(
        _case(
            "ONNX Runtime",
            name,
            *pair(quantize_static, so.quantize_static, fpm, cal, kw, False),
            args,
            variant="quantize_static QDQ U8S8 per-channel",
            n_calib=len(cal),
        )
    )
    return out


def flow_openvino(args) -> list[dict]:
    import bench_openvino as bov
    import nncf

    from safeobs import openvino as sov
    from safeobs.data import models

    if args.smoke:
        small = models.mobilenet_v2().features[:4].eval()
        cases = [bov.image_case("MobileNetV2 features[:4] (smoke)", small, 64, 4, 0, 4, 8)]
    else:
        cases = [bov.image_case("MobileNetV2", models.mobilenet_v2().eval(), 224, 4, 0), bov.text_case(4, 0)]
    out = []
    for case in cases:
        ds = nncf.Dataset(case["calib"])
        kw = dict(subset_size=len(case["calib"]), model_type=case["model_type"])

        def stock(case=case, ds=ds, kw=kw):
            nncf.quantize(case["ov"], ds, **kw)

        def safe(case=case, ds=ds, kw=kw):
            sov.quantize(case["ov"], ds, **kw)

        name = case["name"].split(" (")[0] if not args.smoke else case["name"]
        out.append(_case("OpenVINO (NNCF)", name, stock, safe, args, n_calib=len(case["calib"])))
    return out


WORKERS = {"pt2e": flow_pt2e, "torchao": flow_torchao, "onnx": flow_onnx, "openvino": flow_openvino}


def worker(args) -> None:
    import logging

    logging.disable(logging.WARNING)
    sys.path.insert(0, str(HERE))
    if args.worker == "onnx":
        import bench_onnx  # noqa: F401  (pins OMP/BLAS threads before numpy/torch load, as the ONNX benchmark does)
    recs = [r for r in WORKERS[args.worker](args) if r is not None]
    res = {"flow": args.worker, "records": recs, "threads": threads_info()}
    Path(args.json).write_text(json.dumps(res, indent=1, default=float))


# -- report ------------------------------------------------------------------------------------------


def _label(rec) -> str:
    return f"{rec['model']}" + (f" — {rec['variant']}" if rec.get("variant") else "")


def render(res: dict, out: Path) -> None:
    h = res["host"]
    lines = [
        "# Calibration time: safeobs data-aware flows vs the stock flows (issue 19)",
        "",
        f"Host: {h['cpu']} ({h['cores']} cores; ISA flags: {', '.join(h['isa'])}); the quantizers here are "
        "CPU-agnostic Python + BLAS (no int8 kernel runs in a calibration, except OpenVINO's/ORT's float inference).",
        f"Load average at the start of the run: {res['load_start'][0]:.2f} / {res['load_start'][1]:.2f} / "
        f"{res['load_start'][2]:.2f} (1/5/15 min; the host is shared by other jobs: absolute seconds are noisy, the "
        "ratios are measured side by side).",
        f"Written by `{res['command']}` on {res['date']}.",
        "",
        "Each flow ran in its own process: models and data built once (untimed), one untimed warm-up call of each "
        "flow (fresh-import and first-call costs excluded for both), then "
        f"{res['rounds']} interleaved rounds (stock, safeobs; the order alternates).  Ratio = safeobs s / stock s per "
        "round: median (min-max).  Seconds: median.",
        "",
        "| flow | model | stock | calibration inputs | stock s | safeobs s | ratio median (min-max) | target <= 5x | "
        "load avg (1 min) start → end | threads |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    stock_def = {
        "PT2E": "prepare_pt2e + calibration + convert_pt2e (X86InductorQuantizer default)",
        "torchao": "quantize_(Int8DynamicActivationInt8WeightConfig()) + one float pass over the calibration",
        "ONNX Runtime": "ORT {v}",
        "OpenVINO (NNCF)": "nncf.quantize(subset_size=all)",
    }
    for part in res["flows"]:
        th = part.get("threads", {})
        tdesc = f"torch {th.get('torch_threads')}; " + ", ".join(th.get("blas", []))
        if th.get("env"):
            tdesc += "; " + ", ".join(f"{k}={v}" for k, v in th["env"].items())
        for rec in part["records"]:
            s = summary(rec)
            sd = stock_def[rec["flow"]].format(v=rec.get("variant", ""))
            lines.append(
                f"| {rec['flow']} | {rec['model']} | {sd} | {rec.get('n_calib', '')} | {s['stock']:.2f} | "
                f"{s['safeobs']:.2f} | **{s['ratio']:.2f}x** ({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | "
                f"{'**met**' if s['met'] else '**missed**'} | {rec['load_start'][0]:.2f} → {rec['load_end'][0]:.2f} | "
                f"{tdesc} |"
            )
            if rec["flow"] == "torchao" and rec.get("quantize_only_s"):
                import numpy as np

                q = float(np.median(rec["quantize_only_s"]))
                lines.append(
                    f"| torchao | {rec['model']} | quantize_ alone (no calibration at all) | 0 | {q:.2f} | "
                    f"{s['safeobs']:.2f} | {s['safeobs'] / q:.1f}x (median s / median s) | n/a: torchao's dynamic config "
                    "does not calibrate | | |"
                )
    missing = [f for f in res["requested"] if f not in {p["flow"] for p in res["flows"]}]
    for f in missing:
        lines.append(f"| {f} | — | not measured: {res['errors'].get(f, 'not run')} | | | | | | | |")
    lines += [
        "",
        "Stock definitions are those of the flow benchmarks (`bench_pt2e.py`, `bench_torchao.py`, `bench_onnx.py`, "
        "`bench_openvino.py`; see this script's docstring).  The safeobs flows are data-aware: "
        "`safeobs.quantize_pt2e(exported, example, calibration)`, `safeobs.torchao.quantize_(model, calibration=...)`, "
        "`safeobs.onnx.quantize_dynamic(..., calibration_data_reader=...)` / `safeobs.onnx.quantize_static(...)`, "
        "`safeobs.openvino.quantize(...)`.",
        "",
        *[f"- {n}" for n in res.get("notes", [])],
        "" if res.get("notes") else "",
        "![calibration time ratios](calibration.png)",
        "",
    ]
    (out / "calibration.md").write_text("\n".join(lines))
    plot(res, out / "calibration.png")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    pairs = [(r, p.get("threads", {})) for p in res["flows"] for r in p["records"]]
    if not pairs:
        return
    recs = [r for r, _ in pairs]
    labels = [f"{r['flow']}, torch threads {t.get('torch_threads', '?')}\n{_label(r)}" for r, t in pairs]
    med = np.array([summary(r)["ratio"] for r in recs])
    lo = med - np.array([summary(r)["ratio_min"] for r in recs])
    hi = np.array([summary(r)["ratio_max"] for r in recs]) - med
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(recs) + 1.5))
    y = np.arange(len(recs))
    ax.barh(y, med, xerr=[lo, hi], color=["tab:green" if m <= TARGET else "tab:red" for m in med], capsize=3)
    for i, r in enumerate(recs):
        ax.plot(r["ratios"], [i] * len(r["ratios"]), "k.", ms=4)
    ax.axvline(TARGET, color="k", ls="--", lw=1, label="target 5x")
    ax.set_xscale("log")
    lo_all = min(min(r["ratios"]) for r in recs)
    ax.set_xlim(min(1.0, 0.8 * lo_all), 1.5 * max(max(r["ratios"]) for r in recs))
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("calibration time: safeobs / stock (median, whiskers min-max, dots: rounds)")
    h = res["host"]
    ax.set_title(f"{h['cpu']}, load avg {res['load_start'][0]:.1f} at start", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(parts: list[dict]) -> dict:
    """One report from several runs (e.g. a flow re-run with other threads): flows concatenated, each tagged with
    its run's command and load; a flow's error is dropped when another run measured it."""
    if not parts:
        raise ValueError("nothing to merge")
    res = dict(parts[0], flows=[], errors={}, requested=[], command=" + ".join(p["command"] for p in parts))
    for p in parts:
        for f in p["flows"]:
            # a flow from an earlier merge keeps the run it came from
            res["flows"].append(dict(f, run=f.get("run", p["command"]), run_load=f.get("run_load", p["load_start"])))
        res["requested"] += [f for f in p["requested"] if f not in res["requested"]]
        res["errors"].update(p["errors"])
    measured = {f["flow"] for f in res["flows"]}
    res["errors"] = {k: v for k, v in res["errors"].items() if k not in measured}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds per case (>= 3 for the report)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls of each flow")
    ap.add_argument("--smoke", action="store_true", help="tiny models: plumbing only")
    ap.add_argument(
        "--out", type=Path, default=None, help="results directory (default: benchmarks/results; smoke: none)"
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per flow worker")
    ap.add_argument("--models", nargs="+", help="only these models (e.g. MiniLM MobileNetV2)")
    ap.add_argument("--threads", type=int, help="OMP/OpenBLAS/MKL threads of the workers (default: the libraries')")
    ap.add_argument("--worker", choices=FLOWS, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--merge", nargs="+", type=Path, help="render the union of saved calibration.json files to --out")
    ap.add_argument("--note", action="append", help="with --merge: a note line for the report")
    args = ap.parse_args(argv)
    if args.merge:
        res = merge([json.loads(p.read_text()) for p in args.merge])
        res["notes"] = args.note or []
        out = args.out or RESULTS
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(res, indent=1, default=float))
        render(res, out)
        return 0
    if args.worker:
        worker(args)
        return 0
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    res = {
        "host": host_info(),
        "load_start": os.getloadavg(),
        "rounds": args.rounds,
        "warmup": args.warmup,
        "requested": args.flows,
        "command": "python benchmarks/bench_calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "flows": [],
        "errors": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_calib_"))
    for flow in args.flows:
        js = tmp / f"{flow}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", flow, "--json", str(js)]
        cmd += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)] + (["--smoke"] if args.smoke else [])
        cmd += ["--models", *args.models] if args.models else []
        env = dict(os.environ)
        if args.threads:
            env.update({v: str(args.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")})
        log(f"worker {flow}")
        try:
            p = subprocess.run(cmd, timeout=args.timeout, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
            if p.returncode != 0 or not js.exists():
                res["errors"][flow] = f"worker exited {p.returncode}"
                continue
        except subprocess.TimeoutExpired:
            res["errors"][flow] = f"worker timed out after {args.timeout:.0f} s"
            continue
        res["flows"].append(json.loads(js.read_text()))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "calibration.json").write_text(json.dumps(res, indent=1, default=float))
            render(res, out)
    if out is not None:
        (out / "calibration.json").write_text(json.dumps(res, indent=1, default=float))
        render(res, out)
    print(json.dumps({f["flow"]: [summary(r) | {"model": _label(r)} for r in f["records"]] for f in res["flows"]}))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
