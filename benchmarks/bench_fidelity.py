"""Issue 6: end-to-end fidelity of every stock int8 configuration vs safeobs, on real models and real kernels.

Models: all-MiniLM-L6-v2 (static: Linear layers only; dynamic) and MobileNetV2 in two FX graphs (stock ReLU6,
and the ReLU variant FX fuses into conv+bn+relu).  Configurations, all calibrated once on the same data:

* torch x86 default mapping (HistogramObserver reduce_range=True: 7-bit activations);
* torch onednn default mapping (8-bit activations, torch's per-channel min-max weights: can saturate);
* 7-bit weights [-64, 63] per-channel + 8-bit activations (NNCF overflow_fix / ORT reduce_range style);
* safeobs layout x86, safeobs layout fbgemm;
* MiniLM dynamic: torch ``quantize_dynamic`` (7-bit inputs), the same with 8-bit inputs and per-channel stock
  weights (unsafe), ``safeobs.quantize_dynamic``.

Runs, on any host: the AVX2 columns on this host's real AVX2 kernels (native on an AVX2 host, worker processes
forced to AVX2 elsewhere; a column a forced process cannot reach is emulated and labelled so); the VNNI columns on
the real kernels of a VNNI host, else through :mod:`safeobs.emulator` (bit-exact vs the real kernels); a qemu
Haswell confirmation on a subset; the saturation-free reference through the emulator.  Every row records which
kernel produced each column (``source``).
Writes benchmarks/results/fidelity.md and fidelity.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.ao.nn.quantized.dynamic as nnqd
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch.ao.quantization import PerChannelMinMaxObserver, QConfig, QConfigMapping
from torch.ao.quantization.observer import ObserverBase
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import safeobs
from safeobs import data, emulator
from safeobs.data import models
from safeobs.kernels import realkernel
from safeobs.tools import realrun

warnings.filterwarnings("ignore")
OUT = Path(__file__).resolve().parent / "results"
ENGINES = ("fbgemm", "x86")
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- configurations -----------------------------------------------------------------------------------


def _seven_bit_weights() -> QConfigMapping:
    """torch's onednn mapping (8-bit activations) with per-channel symmetric weights in [-64, 63]."""
    base = tq.get_default_qconfig_mapping("onednn")
    w7 = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-64, quant_max=63
    )
    qc = QConfig(activation=base.global_qconfig.activation, weight=w7)
    mapping = QConfigMapping().set_global(qc)
    for key, q in base.object_type_qconfigs.items():
        if q is not None and q.weight is base.global_qconfig.weight:
            q = QConfig(q.activation, w7)
        mapping.set_object_type(key, q)
    return mapping


# key: (label, activation bits, weight, mapping factory, is safeobs)
STATIC = {
    "torch-x86": (
        "torch x86 default",
        "7 (reduce_range)",
        "8-bit min-max",
        lambda: tq.get_default_qconfig_mapping("x86"),
        False,
    ),
    "torch-onednn": (
        "torch onednn default (full range)",
        "8",
        "8-bit min-max",
        lambda: tq.get_default_qconfig_mapping("onednn"),
        False,
    ),
    "w7": ("7-bit weights [-64, 63]", "8", "7-bit min-max", _seven_bit_weights, False),
    "safe-x86": ("**safeobs layout x86**", "8", "safe (x86)", lambda: safeobs.get_default_qconfig_mapping("x86"), True),
    "safe-fbgemm": (
        "**safeobs layout fbgemm**",
        "8",
        "safe (fbgemm)",
        lambda: safeobs.get_default_qconfig_mapping("fbgemm"),
        True,
    ),
}
CALIB_KEY = "torch-onednn"  # the one prepared model that sees the calibration data
REFERENCE = "torch-onednn"  # saturation-free full-range reference: this model run exactly


def linear_only(mapping: QConfigMapping) -> QConfigMapping:
    return QConfigMapping().set_global(None).set_object_type(torch.nn.Linear, mapping.global_qconfig)


class Stock8BitDynamicLinear(nnqd.Linear):
    """torch's dynamic Linear with the 7-bit input workaround switched off: 8-bit inputs, stock weights (unsafe)."""

    reduce_range = False  # read by safeobs.emulator.emulate

    def forward(self, x):
        return torch.ops.quantized.linear_dynamic(x, self._packed_params._packed_params, reduce_range=False).to(x.dtype)


def _torch_dynamic(model):
    return tq.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _stock_8bit_dynamic(model):
    qc = QConfig(activation=tq.default_dynamic_quant_observer, weight=tq.default_per_channel_weight_observer)
    out = tq.quantize_dynamic(model, {torch.nn.Linear: qc}, dtype=torch.qint8)
    for mod in out.modules():
        if type(mod) is nnqd.Linear:
            mod.__class__ = Stock8BitDynamicLinear
    return out


DYNAMIC = {
    "torch-dyn": ("torch quantize_dynamic", "7 (reduce_range)", "8-bit per-tensor", _torch_dynamic, False),
    "dyn-8bit": ("8-bit inputs + torch per-channel weights", "8", "8-bit per-channel", _stock_8bit_dynamic, False),
    "safe-dyn": (
        "**safeobs.quantize_dynamic**",
        "8",
        "safe (x86)",
        lambda m: safeobs.quantize_dynamic(m, backend="x86"),
        True,
    ),
}
DYN_REFERENCE = "dyn-8bit"


# -- metrics ------------------------------------------------------------------------------------------


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    err = float(((y - ref) ** 2).sum())
    return float("inf") if err == 0 else float(10 * np.log10(float((ref**2).sum()) / err))


def image_metrics(ref, y) -> dict:
    return {"sqnr": sqnr(ref, y), "top1": float((y.argmax(1) == ref.argmax(1)).double().mean())}


def _nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


def text_metrics(ref, y) -> dict:
    return {
        "sqnr": sqnr(ref, y),
        "cos": float(F.cosine_similarity(ref.double(), y.double(), dim=1).mean()),
        "nn": float((_nearest(y.double()) == _nearest(ref.double())).double().mean()),
    }


# -- building quantized models --------------------------------------------------------------------------


def share_calibration(src, dst) -> None:
    """Give ``dst`` the activation statistics ``src`` collected.  Observer forwards do not depend on the
    quantization range (reduce_range only enters calculate_qparams), so this equals calibrating ``dst``
    on the same data (tests/test_bench_fidelity.py checks it)."""
    so = {n: m for n, m in src.named_modules() if isinstance(m, ObserverBase)}
    do = {n: m for n, m in dst.named_modules() if isinstance(m, ObserverBase)}
    if so.keys() != do.keys():
        raise RuntimeError("prepared graphs differ; cannot share calibration")
    for name, d in do.items():
        s = so[name]
        if type(s) is not type(d):
            raise RuntimeError(f"{name}: observer types differ ({type(s).__name__} vs {type(d).__name__})")
        d.load_state_dict(s.state_dict())


def build_static(float_model, example, calib_batches, mappings: dict) -> dict:
    """{config: {engine: converted model}}; calibrated once (CALIB_KEY), statistics shared."""
    prepared = {k: prepare_fx(copy.deepcopy(float_model), make(), example) for k, make in mappings.items()}
    src = prepared[CALIB_KEY]
    with torch.no_grad():
        for batch in calib_batches:
            src(*batch)
    out = {}
    for key, p in prepared.items():
        if p is not src:
            share_calibration(src, p)
        out[key] = {}
        for engine in ENGINES:  # prepack under each engine, as a user of that engine would
            torch.backends.quantized.engine = engine
            out[key][engine] = convert_fx(copy.deepcopy(p))
    return out


def build_dynamic(float_model, configs: dict) -> dict:
    out = {}
    for key, (*_, make, _safe) in configs.items():
        out[key] = {}
        for engine in ENGINES:
            torch.backends.quantized.engine = engine
            out[key][engine] = make(copy.deepcopy(float_model))
    return out


# -- runs -------------------------------------------------------------------------------------------------


def _equal(a, b) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


COLUMNS = tuple(f"{isa}-{engine}" for isa in ("avx2", "vnni") for engine in ENGINES)


def evaluate(qmodels: dict, run, ref, metric, *, exact_always: bool) -> dict:
    """Every column (AVX2 / VNNI x engine fbgemm / x86) from the real kernels where this process runs them,
    else from the bit-exact emulator; saturation counts from the emulator; the saturation-free reference.

    This process's kernels are ``realkernel.process_isa()``: the host's, or AVX2 when the benchmark forced
    it (``main`` does that on AVX-512 hosts).  A forced process cannot run engine x86's convs as an AVX2
    CPU does (VNNI hosts route them to oneDNN by cpuinfo: ``realkernel.forced_mismatch``); such a column
    is emulated.  ``r["source"]`` records, per column, which kernel produced it."""
    r = {"outputs": {}, "source": {}, "emu_checks": {}}
    sat = {}
    with torch.no_grad():
        for col in COLUMNS:
            isa, engine = col.split("-")
            m = qmodels[engine]
            torch.backends.quantized.engine = engine
            real = None
            if (
                realkernel.process_isa(engine) == isa
                and realkernel.forced_mismatch(isa, engine, realrun.model_convs(m)) is None
            ):
                real = run(m)
                r["source"][col] = realkernel.describe(_process_mode(engine), engine)
            skip_emu = real is not None and engine == "x86" and isa == "avx2"  # x86 == fbgemm on AVX2 (§3)
            if not skip_emu:
                with emulator.emulate(m, engine=engine, isa=isa) as em:
                    emu = run(m)
                sat[col] = (em.total, sum(1 for v in em.saturation.values() if v))
                if real is not None:
                    r["emu_checks"][col] = _equal(emu, real)
            if real is None:
                r["source"][col] = f"{engine} on {isa} (emulated)"
            r["outputs"][col] = emu if real is None else real
        torch.backends.quantized.engine = "fbgemm"
        m = qmodels["fbgemm"]
        if sat["avx2-fbgemm"][0] or exact_always:
            with emulator.emulate(m, engine="fbgemm", isa="avx2", exact=True):
                exact = run(m)
        else:
            # no lane saturated: the emulator's correction term sat16(s) - s is zero everywhere, so the
            # exact run IS the AVX2 run
            exact = r["outputs"]["avx2-fbgemm"]
    out = r["outputs"]
    out["exact"] = exact
    r["metrics"] = {k: metric(ref, v) for k, v in out.items()}
    r["sat"], r["sat_layers"] = sat["avx2-fbgemm"]
    r["sat_vnni_fbgemm"] = sat["vnni-fbgemm"][0]
    r["sat_vnni_x86"] = sat["vnni-x86"][0]
    # None: no column's kernel runs in this process (an AVX-512 host without forcing; main() forces AVX2)
    r["emu_eq_native"] = all(r["emu_checks"].values()) if r["emu_checks"] else None
    r["x86_eq_fbgemm"] = _equal(out["avx2-x86"], out["avx2-fbgemm"])
    r["avx2_eq_vnni_fbgemm"] = _equal(out["avx2-fbgemm"], out["vnni-fbgemm"])
    r["avx2_eq_vnni_x86"] = _equal(out["avx2-x86"], out["vnni-x86"])
    r["exact_ran"] = bool(sat["avx2-fbgemm"][0] or exact_always)
    r["digest"] = {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest() for k, v in out.items()}
    del r["outputs"]
    return r


def merge_passes(avx2_pass: list, vnni_pass: list) -> list:
    """Results of the AVX2 pass with the VNNI columns of a native pass on a VNNI host (real VNNI kernels).

    Both passes build the same models deterministically and run the same float code (only the int8
    kernels' ISA differs), so outputs are compared through their digests."""
    out = copy.deepcopy(avx2_pass)
    for res, other in zip(out, vnni_pass):
        for r, o in zip(res["rows"], other["rows"]):
            assert r["key"] == o["key"]
            for col in ("vnni-fbgemm", "vnni-x86"):
                r["metrics"][col], r["source"][col], r["digest"][col] = (
                    o["metrics"][col],
                    o["source"][col],
                    o["digest"][col],
                )
                if col in o["emu_checks"]:
                    r["emu_checks"][col] = o["emu_checks"][col]
            r["emu_eq_native"] = all(r["emu_checks"].values())
            r["avx2_eq_vnni_fbgemm"] = r["digest"]["avx2-fbgemm"] == r["digest"]["vnni-fbgemm"]
            r["avx2_eq_vnni_x86"] = r["digest"]["avx2-x86"] == r["digest"]["vnni-x86"]
    return out


def _process_mode(engine: str) -> str:
    """The realkernel mode this process is in, for labels."""
    isa = realkernel.process_isa(engine)
    return "native" if isa == realkernel.host_isa() else isa


def run_qemu(jobs, tmp: str):
    """jobs: list of (label, engine, model, x, native output).  Traces and saves every model in the main thread,
    then runs them under qemu Haswell in a background thread; returns a future of [(label, engine, equal)]."""
    saved = []
    with torch.no_grad():
        for i, (label, engine, model, x, want) in enumerate(jobs):
            torch.backends.quantized.engine = engine
            path = os.path.join(tmp, f"q{i}.pt")
            torch.jit.save(torch.jit.trace(model, x[:1]), path)
            saved.append((label, engine, path, x.numpy(), want.numpy()))

    def work():
        res = []
        for label, engine, path, x, want in saved:
            t = time.perf_counter()
            got = realrun.run_module(path, [x], mode="haswell", engine=engine, trust_pickle=True)[0]
            res.append((label, engine, bool(np.array_equal(got, want)), time.perf_counter() - t))
            log(f"qemu {label} {engine}: {'bit-identical' if res[-1][2] else 'DIFFERENT'} ({res[-1][3]:.0f}s)")
        return res

    return concurrent.futures.ThreadPoolExecutor(max_workers=1).submit(work)


# -- the benchmark ------------------------------------------------------------------------------------------


def bench_minilm(n_calib=None, n_held=None) -> list:
    model = models.minilm().eval()
    tok = models.tokenizer()
    calib = data.sentences("calib")[:n_calib]
    held = data.sentences("heldout")[:n_held]
    with torch.no_grad():
        ref = models.embed(model, held, tok)
    b = tok(calib)
    batch = (b["input_ids"], b["attention_mask"])

    def run(m):
        return models.embed(m, held, tok)

    log(f"MiniLM: {len(calib)} calibration / {len(held)} held-out sentences")
    static = build_static(
        model,
        (batch[0][:1], batch[1][:1]),
        [batch],
        {k: (lambda mk=v[3]: linear_only(mk())) for k, v in STATIC.items()},
    )
    rows = []
    for key, qm in static.items():
        rows.append(dict(key=key, cfg=_cfg(STATIC[key]), **evaluate(qm, run, ref, text_metrics, exact_always=False)))
        log(f"MiniLM static {key}: {rows[-1]['metrics']['avx2-fbgemm']}, sat {rows[-1]['sat']}")
    dyn = build_dynamic(model, DYNAMIC)
    drows = []
    for key, qm in dyn.items():
        drows.append(dict(key=key, cfg=_cfg(DYNAMIC[key]), **evaluate(qm, run, ref, text_metrics, exact_always=False)))
        log(f"MiniLM dynamic {key}: {drows[-1]['metrics']['avx2-fbgemm']}, sat {drows[-1]['sat']}")
    return [
        dict(name="MiniLM static (Linear layers)", kind="text", rows=rows, ref=REFERENCE, n=(len(calib), len(held))),
        dict(name="MiniLM dynamic", kind="text", rows=drows, ref=DYN_REFERENCE, n=(len(calib), len(held))),
    ]


def _cfg(c) -> tuple:
    """(label, activation bits, weights, is safeobs): the picklable part of a configuration."""
    return (c[0], c[1], c[2], c[-1])


def bench_mobilenet(relu6: bool, n_calib=None, n_held=None, qemu_photos=4):
    """One MobileNetV2 graph; with ``qemu_photos`` (ReLU6 graph) also the qemu Haswell confirmation."""
    calib = data.photos("calib")
    held = data.photos("heldout")
    if n_calib:
        calib = calib[:: max(1, len(calib) // n_calib)][:n_calib]
    if n_held:
        held = held[:: max(1, len(held) // n_held)][:n_held]
    batches = [(calib[i : i + 40],) for i in range(0, len(calib), 40)]
    name = "MobileNetV2, stock ReLU6 graph" if relu6 else "MobileNetV2, ReLU graph (conv+bn+relu fused)"
    log(f"{name}: {len(calib)} calibration / {len(held)} held-out photos")
    model = models.mobilenet_v2(relu6=relu6).eval()
    with torch.no_grad():
        ref = model(held)
    qms = build_static(model, (calib[:1],), batches, {k: v[3] for k, v in STATIC.items()})
    log(f"{name}: calibrated and converted")
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        qemu = None
        if qemu_photos:
            x = held[:: max(1, len(held) // qemu_photos)][:qemu_photos]
            jobs = []
            for key in ("torch-onednn", "safe-x86"):
                for engine in ENGINES:
                    torch.backends.quantized.engine = engine
                    m = qms[key][engine]
                    with torch.no_grad():  # this process's AVX2 kernels where it runs them, else the emulator
                        if (
                            realkernel.process_isa(engine) == "avx2"
                            and realkernel.forced_mismatch("avx2", engine, realrun.model_convs(m)) is None
                        ):
                            want = m(x)
                        else:
                            with emulator.emulate(m, engine=engine, isa="avx2"):
                                want = m(x)
                    jobs.append((key, engine, m, x, want))
            qemu = run_qemu(jobs, tmp)
        rows = []
        for key, qm in qms.items():
            rows.append(
                dict(
                    key=key,
                    cfg=_cfg(STATIC[key]),
                    **evaluate(qm, lambda m: m(held), ref, image_metrics, exact_always=False),
                )
            )
            log(f"{name} {key}: {rows[-1]['metrics']['avx2-fbgemm']}, sat {rows[-1]['sat']}")
        qemu = qemu.result() if qemu else None
    return [dict(name=name, kind="image", rows=rows, ref=REFERENCE, n=(len(calib), len(held)))], qemu


def _task(name: str, args: dict):
    """One benchmark task in a worker process: returns (results, qemu results or None)."""
    torch.manual_seed(0)
    warnings.filterwarnings("ignore")
    if name == "minilm":
        return bench_minilm(args["calib_sentences"], args["sentences"]), None
    return bench_mobilenet(
        name == "relu6", args["calib_photos"], args["photos"], args["qemu_photos"] if name == "relu6" else 0
    )


def check_targets(results) -> list:
    """[(target, met, detail)]."""
    out = []
    ident = [
        (res["name"], r["key"]) for res in results for r in res["rows"] if r["cfg"][-1] and not r["avx2_eq_vnni_fbgemm"]
    ]
    out.append(
        (
            "safeobs: AVX2 and VNNI outputs bit-identical with engine fbgemm, every model and graph",
            not ident,
            "all identical" if not ident else f"differs: {ident}",
        )
    )
    worse, gaps = [], []
    for res in results:
        rows = {r["key"]: r for r in res["rows"]}
        stock = [r for r in res["rows"] if not r["cfg"][-1]]
        best_stock = max(stock, key=lambda r: r["metrics"]["avx2-fbgemm"]["sqnr"])
        refq = rows[res["ref"]]["metrics"]["exact"]["sqnr"]
        for r in res["rows"]:
            if not r["cfg"][-1]:
                continue
            q = r["metrics"]["avx2-fbgemm"]["sqnr"]
            if q <= best_stock["metrics"]["avx2-fbgemm"]["sqnr"]:
                worse.append(
                    f"{res['name']} / {r['key']}: {q:.2f} dB <= {best_stock['key']} "
                    f"{best_stock['metrics']['avx2-fbgemm']['sqnr']:.2f} dB"
                )
            gaps.append((refq - q, res["name"], r["key"]))
    out.append(
        (
            "safeobs beats every stock configuration on the AVX2 CPU (SQNR), every model and graph",
            not worse,
            "yes" if not worse else "; ".join(worse),
        )
    )
    bad = [g for g in gaps if g[0] > 0.5]
    worst = max(gaps)
    out.append(
        (
            "safeobs within 0.5 dB of the saturation-free full-range reference",
            not bad,
            f"largest gap {worst[0]:.2f} dB ({worst[1]} / {worst[2]})"
            if not bad
            else "; ".join(f"{n} / {k}: {g:.2f} dB below" for g, n, k in bad),
        )
    )
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _fmt(m: dict, kind: str) -> str:
    q = "∞" if m["sqnr"] == float("inf") else f"{m['sqnr']:.2f}"
    if kind == "image":
        return f"{q} / {100 * m['top1']:.1f}%"
    return f"{q} / {m['cos']:.4f} / {100 * m['nn']:.0f}%"


def _yn(v: bool) -> str:
    return "yes" if v else "**no**"


def _col_head(res, col: str) -> str:
    """ "AVX2 real, fbgemm" / "VNNI emulated, x86": what produced the column in every row of ``res``."""
    isa, engine = col.split("-")
    kinds = {"emulated" if "(emulated)" in r["source"][col] else "real" for r in res["rows"]}
    return f"{isa.upper()} {'/'.join(sorted(kinds))}, {engine}"


def _sources(results) -> str:
    seen = dict.fromkeys(f"{col}: {r['source'][col]}" for res in results for r in res["rows"] for col in COLUMNS)
    return "; ".join(f"`{s}`" for s in seen)


def detail_table(res) -> list:
    kind = res["kind"]
    unit = "SQNR dB / top-1 agreement" if kind == "image" else "SQNR dB / mean cosine / NN agreement"
    lines = [
        f"### {res['name']}",
        "",
        f"{res['n'][0]} calibration / {res['n'][1]} held-out {'photos' if kind == 'image' else 'sentences'}; "
        f"cells: {unit} vs FP32.",
        "",
        "| configuration | act. bits | weights | "
        + " | ".join(_col_head(res, c) for c in COLUMNS)
        + " | no saturation (exact) | saturated lanes AVX2 (layers) | AVX2 ≡ VNNI fbgemm "
        "| AVX2 ≡ VNNI x86 | emulator ≡ real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        label, abits, w, *_ = r["cfg"]
        m = r["metrics"]
        exact = _fmt(m["exact"], kind) + ("" if r["exact_ran"] else " †")
        lines.append(
            f"| {label} | {abits} | {w} | {_fmt(m['avx2-fbgemm'], kind)} | {_fmt(m['avx2-x86'], kind)} | "
            f"{_fmt(m['vnni-fbgemm'], kind)} | {_fmt(m['vnni-x86'], kind)} | {exact} | "
            f"{r['sat']:,} ({r['sat_layers']}) | {_yn(r['avx2_eq_vnni_fbgemm'])} | "
            f"{_yn(r['avx2_eq_vnni_x86'])} | {_yn(r['emu_eq_native'])} |"
        )
    lines.append("")
    return lines


def main_table(results) -> list:
    heads = [res["name"] for res in results]
    lines = ["| configuration | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    keys = list(STATIC) + list(DYNAMIC)
    for key in keys:
        cells, label = [], None
        for res in results:
            row = next((r for r in res["rows"] if r["key"] == key), None)
            if row is None:
                cells.append("")
                continue
            label = row["cfg"][0]
            m = row["metrics"]["avx2-fbgemm"]
            extra = f"{100 * m['top1']:.1f}%" if res["kind"] == "image" else f"NN {100 * m['nn']:.0f}%"
            cells.append(f"{m['sqnr']:.2f} dB, {extra}" + (f", {row['sat']:,} sat." if row["sat"] else ""))
        if label:
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    cells = []
    for res in results:
        m = next(r for r in res["rows"] if r["key"] == res["ref"])["metrics"]["exact"]
        cells.append(f"{m['sqnr']:.2f} dB")
    lines.append("| *saturation-free full-range reference (emulated exact)* | " + " | ".join(cells) + " |")
    return lines


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results), 4.4))
    cols = [
        ("avx2-fbgemm", "AVX2 real kernels", "C0"),
        ("vnni-fbgemm", "VNNI fbgemm", "C1"),
        ("exact", "no saturation (exact)", "C2"),
    ]
    for ax, res in zip(np.atleast_1d(axes), results):
        rows = res["rows"]
        xs = np.arange(len(rows))
        for i, (k, lab, c) in enumerate(cols):
            ax.bar(xs + (i - 1) * 0.27, [r["metrics"][k]["sqnr"] for r in rows], 0.27, label=lab, color=c)
        refq = next(r for r in rows if r["key"] == res["ref"])["metrics"]["exact"]["sqnr"]
        ax.axhline(refq, color="k", ls="--", lw=1, label="full-range reference (exact)")
        ax.set_xticks(
            xs,
            [
                r["cfg"][0]
                .strip("*")
                .replace(" default", "")
                .replace("safeobs ", "safeobs\n")
                .replace(" (full range)", "\n(full range)")
                .replace("quantize_dynamic", "dynamic")
                .replace("8-bit inputs + torch per-channel weights", "8-bit in +\nstock per-ch. w")
                for r in rows
            ],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        lo = min(r["metrics"][k]["sqnr"] for r in rows for k, *_ in cols)
        hi = max(r["metrics"][k]["sqnr"] for r in rows for k, *_ in cols)
        ax.set_ylim(max(0.0, lo - 2), hi + 1.5)
        ax.set(title=res["name"].replace(" (conv+bn+relu fused)", "\n(conv+bn+relu fused)"), ylabel="SQNR vs FP32 (dB)")
        ax.title.set_fontsize(9)
        ax.grid(axis="y", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(results, qemu, targets, runtime, host, path):
    md = [
        "# Fidelity: stock int8 configurations vs safeobs, real models, real kernels",
        "",
        "Generated by `benchmarks/bench_fidelity.py` in one run "
        f"({runtime / 60:.1f} min on {os.cpu_count()} cores, torch {torch.__version__}, host ISA `{host}`).",
        "",
        "## Main table: on the real AVX2 kernels (engine fbgemm; engine x86 is bit-identical on this CPU)",
        "",
        "MobileNetV2 cells: logit SQNR vs FP32, top-1 agreement with FP32.  MiniLM cells: embedding SQNR vs FP32, "
        'nearest-neighbour agreement.  "sat." = int16 lanes that saturated (counted by the emulator).',
        "",
    ]
    md += main_table(results)
    md += ["", "## Targets", "", "| target | met | detail |", "|---|---|---|"]
    md += [f"| {t} | {'**met**' if ok else '**missed**'} | {d} |" for t, ok, d in targets]
    md += [
        "",
        "## What the columns are, and why some are emulated",
        "",
        f"* **Host: `{host}`** (`realkernel.host_isa()`).  Which kernel produced each column, as recorded by "
        "`evaluate` (`realkernel.describe`): " + _sources(results) + '.  "real" columns are torch\'s own '
        "quantized kernels; on a non-VNNI CPU the `x86` engine dispatches every conv to FBGEMM, so engine x86 "
        "and fbgemm compute the same thing (the tables show it bit for bit).  An AVX-512 host runs the AVX2 "
        "columns in worker processes forced to AVX2 (these models have no FBGEMM groupwise conv); a VNNI host "
        "cannot run engine x86's AVX2 conv routing that way (cpuinfo decides it), so that column is emulated "
        "there, and its VNNI columns come from a second, native pass.",
        "* **qemu Haswell confirmation**: the MobileNetV2 ReLU6 models (torch onednn mapping, which saturates, and "
        "safeobs x86) were TorchScript-traced and run under `qemu-x86_64 -cpu Haswell` on a subset of held-out photos, "
        "with both engines:",
        "",
    ]
    md += ["  | model | engine | native == qemu Haswell, bit for bit | qemu time |", "  |---|---|---|---|"]
    if qemu:
        md += [f"  | {STATIC[k][0].strip('*')} | {e} | {_yn(eq)} | {t:.0f} s |" for k, e, eq, t in qemu]
    else:
        md += ["  | (skipped: qemu-x86_64 not available) | | | |"]
    md += [
        "",
        "* **Emulated columns** (VNNI on a host without VNNI) run the same converted "
        'int8 model through `safeobs.emulator` with `isa="vnni"`, the bit-exact model of the kernels that the test '
        "suite checks against the real kernels.  On VNNI, FBGEMM's GEMMs (Linear, 1x1 and im2col convs) accumulate "
        "exactly, but its depthwise and direct-ConvTranspose kernels are AVX2 `vpmaddubsw` code on every CPU and "
        "still saturate; with engine x86, symmetric convs with groups <= 100 go to oneDNN (exact, different "
        "rounding), and depthwise convs with more than 100 channels go to FBGEMM depthwise (saturating).",
        "* **The saturation-free reference is emulated too.**  The issue asked for the int8 model run with engine "
        "onednn on a VNNI machine; instead each int8 model is run through `emulate(..., exact=True)`: the same "
        "kernels and FBGEMM requantization with exact int32 accumulation.  The headline reference is the stock "
        "onednn-mapping model (8-bit activations, torch's 8-bit weights) run exactly; for MiniLM dynamic it is "
        "torch's per-channel weights with 8-bit inputs run exactly.  † = no lane saturated on AVX2, so the exact "
        "run equals the AVX2 run by construction (the emulator's correction term is zero) and was not repeated.",
        "* **emulator ≡ real**: the emulated AVX2 output equals the real AVX2 kernels' output bit for bit, for every "
        "model and configuration, saturating ones included: the saturated-lane counts are those of the real run.",
        "* Calibration: every configuration of a model uses the same activation statistics (HistogramObserver, "
        "collected once on the calibration split, shared between the prepared graphs; observers do not depend "
        "on the quantization range during collection).  Held-out data share no source photo/sentence with "
        "calibration.  Deterministic: no random numbers are drawn.",
        "",
        "## Per model: every run",
        "",
    ]
    for res in results:
        md += detail_table(res)
    md += ["## In plain words", ""] + PLAIN + [""]
    md += ["![fidelity](fidelity.png)", ""]
    gap = path.parent / "mobilenet_gap.md"
    if gap.is_file():  # follow-up analysis (benchmarks/analysis_mobilenet_gap.py), kept beside the results
        md += [gap.read_text().rstrip(), ""]
    draws = path.parent / "fidelity_draws.md"
    if (
        draws.is_file()
    ):  # issue 11: data-aware rounding, mean ± std over draws (written by benchmarks/fidelity_draws.py)
        md += draws.read_text().rstrip("\n").split("\n")
    path.write_text("\n".join(md))


PLAIN = [
    "* **torch's x86 default** protects the kernels by giving activations only 7 bits (`reduce_range=True`).  It "
    "never saturates, but it pays for that on every model, everywhere, including on VNNI CPUs that never needed it.",
    "* **torch's onednn mapping** keeps 8-bit activations with ordinary weights.  On an AVX2 (or AVX-512 without "
    "VNNI) CPU its int16 pairs saturate and the outputs silently drift from what the same model computes exactly; on a "
    "VNNI CPU FBGEMM's depthwise convs still saturate.  The same int8 model gives different answers on different CPUs.",
    "* **7-bit weights** (NNCF overflow_fix, ONNX Runtime reduce_range) are also safe, but throw away a full weight "
    "bit on every channel.",
    "* **safeobs** keeps 8-bit activations and loses on average ~0.4 weight bits only where a pair needs it, so it "
    "never saturates on any x86 CPU: its outputs on AVX2 and on VNNI (engine fbgemm) are bit-identical and equal the "
    'saturation-free result.  Pick `safeobs.get_default_qconfig_mapping("x86")` (safe for every kernel any x86 '
    "CPU can choose) for static quantization, `safeobs.quantize_dynamic` for dynamic; layout `fbgemm` is only "
    "for models that will run with engine fbgemm.",
    "* **Where safeobs falls short (MobileNetV2).**  On both MobileNetV2 graphs 7-bit weights score 0.3-0.8 dB "
    "higher logit SQNR than safeobs, and safeobs is 1.3-1.8 dB below the saturation-free full-range reference, so "
    "two targets are missed there (MiniLM meets all of them).  Every MobileNetV2 configuration sits at only 10-13 dB "
    "(per-tensor 8-bit activations), and the gap to the reference is what safeobs' weight scales cost: ~0.4 bits "
    "on average but up to ~1 bit on the channels with the largest same-sign pairs.  That 7-bit weights (lower weight "
    "SQNR on every layer, see bits.md) beat it is not explained by weight SQNR; top-1 agreement does not show a "
    "consistent order (80 views of 4 photos: one view = 1.25 points).  Open question for a follow-up: per-layer "
    "sensitivity (swap one layer's weights at a time into the reference, run exactly).",
    "* **Engine x86 on VNNI is never bit-identical to AVX2**, for any configuration: oneDNN takes the symmetric "
    "convs and requantizes with different rounding.  Only engine fbgemm can give the same bits on every CPU.",
    "* Two side findings: torch's x86 default *does* saturate on held-out photos (8 lanes in the ReLU graph: "
    "activations beyond the calibrated range get codes above 127, which 7-bit activations do not prevent); and a "
    "VNNI CPU does not rescue the stock onednn mapping on the ReLU6 graph (-5.6 dB, top-1 0%): FBGEMM's depthwise "
    "kernel saturates there too.",
    "* Runtime: the run time above was measured while the project's test suite ran on the same 2 cores (load ~4-5); "
    "the emulated columns dominate it.",
]


def _jsonable(results, qemu, runtime, host) -> dict:
    return {
        "results": results,
        "qemu": qemu,
        "runtime": runtime,
        "host": host,
        "torch": torch.__version__,
        "cores": os.cpu_count(),
    }


def _run_tasks(tasks, targs, workers: int, env: dict) -> dict:
    """{task: result}; every task in a spawned worker process whose environment forces ``env``."""
    saved = {k: os.environ.get(k) for k in ("FBGEMM_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(env)  # read by the spawned workers at start
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=ctx) as pool:
            futures = {t: pool.submit(_task, t, targs) for t in tasks}
            return {t: f.result() for t, f in futures.items()}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=None, help="held-out photos (default: all 80)")
    ap.add_argument("--calib-photos", type=int, default=None, help="calibration photos (default: all 120)")
    ap.add_argument("--sentences", type=int, default=None, help="held-out sentences (default: all 36)")
    ap.add_argument("--calib-sentences", type=int, default=None, help="calibration sentences (default: all 30)")
    ap.add_argument("--no-qemu", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (the emulator is mostly one core)")
    ap.add_argument("--report-only", action="store_true", help="re-render fidelity.md/png from fidelity.json")
    ap.add_argument("--no-draws", action="store_true", help="skip fidelity_draws.py (data-aware rounding, draws)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        saved = json.loads((args.out / "fidelity.json").read_text())
        for res in saved["results"]:
            for r in res["rows"]:
                r["cfg"] = tuple(r["cfg"])
        results, qemu, runtime, host = saved["results"], saved["qemu"], saved["runtime"], saved["host"]
        if any("source" not in r for res in results for r in res["rows"]):
            raise SystemExit(
                f"{args.out / 'fidelity.json'} predates per-column kernel labels (which kernel ran); "
                "re-run benchmarks/bench_fidelity.py without --report-only"
            )
    else:
        host = realkernel.host_isa()
        use_qemu = not args.no_qemu and realkernel.available("haswell")
        targs = dict(
            photos=args.photos,
            calib_photos=args.calib_photos,
            sentences=args.sentences,
            calib_sentences=args.calib_sentences,
            qemu_photos=4 if use_qemu else 0,
        )
        tasks = ("relu6", "relu", "minilm")  # longest first
        # The AVX2 columns need this host's real AVX2 kernels: native on an AVX2 host, else worker
        # processes forced to AVX2 (these models have no FBGEMM groupwise conv; engine x86's convs are
        # then emulated, see evaluate).  A VNNI host also runs a native pass for real VNNI columns.
        passes = [("avx2", "native" if host == "avx2" else "avx2")] + ([("vnni", "native")] if host == "vnni" else [])
        done = {}
        for name, mode in passes:
            log(f"pass {name}: kernels {realkernel.describe(mode, 'fbgemm')}")
            done[name] = _run_tasks(
                tasks,
                dict(targs, qemu_photos=targs["qemu_photos"] if name == "avx2" else 0),
                args.workers,
                realkernel.MODES[mode],
            )
        if "vnni" in done:
            for t in tasks:
                done["avx2"][t] = (merge_passes(done["avx2"][t][0], done["vnni"][t][0]), done["avx2"][t][1])
        done = done["avx2"]
        by = done
        results = by["minilm"][0] + by["relu6"][0] + by["relu"][0]
        qemu = by["relu6"][1]
        runtime = time.perf_counter() - T0
        (args.out / "fidelity.json").write_text(json.dumps(_jsonable(results, qemu, runtime, host), indent=1))
        if not args.no_draws:  # issue 11: every configuration over calibration draws, data-aware rounding
            draws = Path(__file__).with_name("fidelity_draws.py")  # a script that imports this one: run, not import
            subprocess.run(
                [sys.executable, str(draws), "--workers", str(args.workers), "--out", str(args.out), "--no-report"],
                check=True,
            )
    targets = check_targets(results)
    if qemu and not all(q[2] for q in qemu):
        targets.append(("native AVX2 == qemu Haswell", False, "see qemu table"))
    write_report(results, qemu, targets, runtime, host, args.out / "fidelity.md")
    plot(results, args.out / "fidelity.png")
    print("\n".join(main_table(results)))
    for t, ok, d in targets:
        print(f"{'MET   ' if ok else 'MISSED'} {t}: {d}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
